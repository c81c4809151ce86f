//! Private networking: one network namespace per instance (`ip netns add imago-<id>`), joined to
//! the host by a veth pair (`iv-<id>` on the host, `eth0` inside) with a /30 from 10.88.0.0/16.
//!
//! Addresses are host-wide (two imago homes on one machine must not collide), so they are
//! allocated by creating `<ipam>/<index>` with O_EXCL: no lock, no daemon.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::RuntimeError;

/// Default directory of address leases (tmpfs: leases vanish with the namespaces on reboot).
pub const DEFAULT_IPAM_DIR: &str = "/run/imago/ipam";
const BASE: u32 = u32::from_be_bytes([10, 88, 0, 0]);
/// Number of /30 blocks in the /16 (block 0 is never used).
const BLOCKS: u32 = 1 << 14;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub index: u32,
    pub host: Ipv4Addr,
    pub instance: Ipv4Addr,
}

impl Lease {
    fn from_index(index: u32) -> Lease {
        let net = BASE + index * 4;
        Lease {
            index,
            host: Ipv4Addr::from(net + 1),
            instance: Ipv4Addr::from(net + 2),
        }
    }
}

pub fn netns_name(id: &str) -> String {
    format!("imago-{id}")
}

pub fn netns_path(id: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(netns_name(id))
}

/// Host side of the veth pair; at most 15 bytes (IFNAMSIZ).
pub fn host_veth(id: &str) -> String {
    format!("iv-{}", &id[..id.len().min(12)])
}

#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
}

impl Ipam {
    pub fn new(dir: impl Into<PathBuf>) -> Ipam {
        Ipam { dir: dir.into() }
    }

    pub fn allocate(&self, id: &str) -> Result<Lease, RuntimeError> {
        fs::create_dir_all(&self.dir).map_err(RuntimeError::io("cannot create", &self.dir))?;
        for index in 1..BLOCKS {
            let path = self.dir.join(index.to_string());
            match fs::File::options().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(id.as_bytes())
                        .map_err(RuntimeError::io("cannot write", &path))?;
                    return Ok(Lease::from_index(index));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(RuntimeError::Io {
                        action: "cannot create",
                        path,
                        source: e,
                    });
                }
            }
        }
        Err(RuntimeError::AddressesExhausted(
            self.dir.display().to_string(),
        ))
    }

    /// Frees `lease` if it still belongs to `id`.
    pub fn release(&self, id: &str, lease_host: Ipv4Addr) -> Result<(), RuntimeError> {
        let offset = u32::from(lease_host).wrapping_sub(BASE + 1);
        if offset % 4 != 0 {
            return Ok(());
        }
        let path = self.dir.join((offset / 4).to_string());
        match fs::read_to_string(&path) {
            Ok(owner) if owner == id => {
                fs::remove_file(&path).map_err(RuntimeError::io("cannot remove", &path))
            }
            _ => Ok(()),
        }
    }
}

fn ip_batch(id: &str, netns: Option<&str>, script: &str) -> Result<(), RuntimeError> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let net_err = |reason: String| RuntimeError::Network {
        id: id.to_owned(),
        reason,
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| net_err(format!("cannot run ip: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| net_err(format!("cannot write to ip: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| net_err(format!("ip: {e}")))?;
    if !out.status.success() {
        return Err(net_err(format!(
            "ip -batch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Creates the namespace and the veth pair, addresses both ends and brings `lo` up inside.
pub fn setup(id: &str, lease: &Lease) -> Result<(), RuntimeError> {
    let ns = netns_name(id);
    let veth = host_veth(id);
    let host_script = format!(
        "netns add {ns}\n\
         link add {veth} type veth peer name eth0 netns {ns}\n\
         addr add {host}/30 dev {veth}\n\
         link set {veth} up\n",
        host = lease.host,
    );
    let result = ip_batch(id, None, &host_script).and_then(|()| {
        let inner = format!(
            "addr add {inst}/30 dev eth0\n\
             link set eth0 up\n\
             link set lo up\n\
             route add default via {host}\n",
            inst = lease.instance,
            host = lease.host,
        );
        ip_batch(id, Some(&ns), &inner)
    });
    if result.is_err() {
        teardown(id);
    }
    result
}

/// Removes the veth pair and the namespace; quiet and idempotent (parts may already be gone).
pub fn teardown(id: &str) {
    let veth = host_veth(id);
    if Path::new("/sys/class/net").join(&veth).exists() {
        let _ = Command::new("ip")
            .args(["link", "del", &veth])
            .stderr(Stdio::null())
            .status();
    }
    if netns_path(id).exists() {
        let _ = Command::new("ip")
            .args(["netns", "del", &netns_name(id)])
            .stderr(Stdio::null())
            .status();
    }
}
