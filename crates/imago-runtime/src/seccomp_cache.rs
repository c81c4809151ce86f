//! The seccomp filter of an embedded-engine instance, compiled once and loaded as BPF.
//!
//! libcontainer compiles an instance's `linux.seccomp` rules with libseccomp in the container's
//! init on every launch: about 7 ms of CPU for the default profile, the largest single item of a
//! launch. The compiled program depends only on the rules, the host's architecture and the
//! libseccomp version, so imago compiles it once, keeps it under `$IMAGO_HOME/runtime/seccomp`
//! and hands the BPF to the init instead:
//!
//! - The launcher moves the rules out of `config.json` into `seccomp.json` next to it (the same
//!   `linux.seccomp` form) and marks the bundle with the [`ANNOTATION`], so that libcontainer
//!   applies no filter of its own and nobody mistakes the bundle for an unfiltered one.
//! - The supervisor, before it creates the container, takes the program from the cache
//!   ([`FilterCache::filter`]: verified by its digest on every read; compiled and written
//!   atomically when missing or damaged, so a damaged file is never loaded) and gives it to
//!   libcontainer inside [`PrecompiledSeccomp`], its executor.
//! - The executor loads it with `seccomp(SECCOMP_SET_MODE_FILTER)` as the last thing before the
//!   exec, the place runc loads its filter when `noNewPrivileges` is set: after the
//!   capabilities were dropped and `no_new_privs` was set, after the start signal.
//!
//! Profiles that need libcontainer's own handling stay in `config.json` (see [`precompilable`]):
//! a notify action (the listener fd goes back to the engine), or a bundle without
//! `noNewPrivileges` (the filter must then be loaded before the capabilities are dropped).
//! The runc engine always gets the rules in `config.json`.

use std::fs;
use std::io::{Read, Seek};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use imago_oci::Digest;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
    ScmpVersion,
};
use nix::libc;
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator, Spec,
};
use serde_json::Value;

use crate::RuntimeError;

/// The file in the bundle that holds the rules of a precompiled filter.
pub const BUNDLE_FILE: &str = "seccomp.json";
/// The `config.json` annotation that says the filter is in [`BUNDLE_FILE`]; its value is
/// [`PRECOMPILED`].
pub const ANNOTATION: &str = "org.imago.seccomp";
pub const PRECOMPILED: &str = "precompiled";
/// The `config.json` annotation that says which profile the rules are, for the error a filter
/// the kernel refuses gets: [`DEFAULT_PROFILE`] or [`OWN_PROFILE`].
pub const PROFILE_ANNOTATION: &str = "org.imago.seccomp.profile";
pub const DEFAULT_PROFILE: &str = "default";
pub const OWN_PROFILE: &str = "own";

/// Leading bytes of a cache file; the format changes with them.
const MAGIC: &[u8; 8] = b"IMGBPF1\n";
/// Magic, then the SHA-256 (hex) of the cache key followed by the program.
const HEADER_LEN: usize = MAGIC.len() + 64;
/// One BPF instruction (`struct sock_filter`).
const INSTRUCTION_LEN: usize = 8;
/// The kernel's BPF_MAXINSNS for classic BPF.
const MAX_INSTRUCTIONS: usize = 4096;

/// Whether the embedded engine can be handed `section` as a precompiled program.
pub fn precompilable(section: &LinuxSeccomp, no_new_privileges: bool) -> bool {
    let notify = |action: LinuxSeccompAction| action == LinuxSeccompAction::ScmpActNotify;
    no_new_privileges
        && !notify(section.default_action())
        && section.listener_path().is_none()
        && !section
            .syscalls()
            .iter()
            .flatten()
            .any(|rule| notify(rule.action()))
        && section.flags().iter().flatten().all(|flag| {
            matches!(
                flag,
                LinuxSeccompFilterFlag::SeccompFilterFlagLog
                    | LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow
                    | LinuxSeccompFilterFlag::SeccompFilterFlagTsync
            )
        })
}

/// Moves a precompilable `linux.seccomp` out of an embedded-engine `config` and marks it with the
/// [`ANNOTATION`]; returns the section, to be written to [`BUNDLE_FILE`], in the OCI runtime
/// spec's operand order (the embedded engine's config carries libcontainer's, see
/// `seccomp::swap_masked_operands`): what [`compile`] and runc read.
pub fn take_precompilable(
    config: &mut Value,
    default_profile: bool,
) -> Result<Option<Value>, RuntimeError> {
    let Some(section) = config.pointer("/linux/seccomp") else {
        return Ok(None);
    };
    let parsed = parse_section(section.clone(), Path::new("config.json"))?;
    let no_new_privileges = config.pointer("/process/noNewPrivileges") == Some(&Value::Bool(true));
    if !precompilable(&parsed, no_new_privileges) {
        return Ok(None);
    }
    let mut section = config
        .get_mut("linux")
        .and_then(Value::as_object_mut)
        .and_then(|linux| linux.remove("seccomp"));
    if let Some(section) = &mut section {
        crate::seccomp::swap_masked_operands(section);
    }
    let profile = if default_profile {
        DEFAULT_PROFILE
    } else {
        OWN_PROFILE
    };
    if !config.get("annotations").is_some_and(Value::is_object) {
        config["annotations"] = serde_json::json!({});
    }
    if let Some(annotations) = config.get_mut("annotations").and_then(Value::as_object_mut) {
        annotations.insert(ANNOTATION.into(), PRECOMPILED.into());
        annotations.insert(PROFILE_ANNOTATION.into(), profile.into());
    }
    Ok(section)
}

/// The precompiled filter a bundle asks for, from `cache`, in the executor that loads it; `None`
/// when its `config.json` does not carry the [`ANNOTATION`] (no filter, or one libcontainer
/// applies itself). A marked bundle whose rules cannot be read is an error: the instance never
/// starts unfiltered.
pub fn bundle_filter(
    bundle: &Path,
    cache: &FilterCache,
) -> Result<Option<PrecompiledSeccomp>, RuntimeError> {
    let config_path = bundle.join("config.json");
    let config = fs::read(&config_path).map_err(RuntimeError::io("cannot read", &config_path))?;
    let config: Value = serde_json::from_slice(&config).map_err(|source| RuntimeError::Json {
        path: config_path.clone(),
        source,
    })?;
    match config.pointer(&format!("/annotations/{ANNOTATION}")) {
        None => return Ok(None),
        Some(Value::String(marker)) if marker == PRECOMPILED => {}
        Some(other) => {
            return Err(filter_error(
                &config_path,
                format!("unknown {ANNOTATION} annotation {other}"),
            ));
        }
    }
    let rules_path = bundle.join(BUNDLE_FILE);
    let rules = fs::read(&rules_path).map_err(RuntimeError::io("cannot read", &rules_path))?;
    let rules: Value = serde_json::from_slice(&rules).map_err(|source| RuntimeError::Json {
        path: rules_path.clone(),
        source,
    })?;
    let section = parse_section(rules, &rules_path)?;
    if !precompilable(&section, true) {
        return Err(filter_error(
            &rules_path,
            "the rules need the engine's own seccomp support".into(),
        ));
    }
    let profile = match config
        .get("annotations")
        .and_then(|annotations| annotations.get(PROFILE_ANNOTATION))
    {
        Some(Value::String(name)) if name == DEFAULT_PROFILE => "imago's default seccomp profile",
        _ => "the instance's own seccomp profile",
    };
    let (filter, program_path, key) = cache.filter_and_path(&section)?;
    let load_check = LoadCheck::new(&key, &filter.program, &cache.load_record(&key));
    let known_loadable = load_check.as_ref().is_some_and(LoadCheck::passed);
    Ok(Some(PrecompiledSeccomp {
        filter,
        profile: format!(
            "{profile} (rules {}, program {})",
            rules_path.display(),
            program_path.display()
        ),
        known_loadable,
        load_check: load_check.filter(|_| !known_loadable),
    }))
}

/// The record that the kernel of this boot took one program, loaded by a container init whose
/// launcher had no seccomp filter of its own: a file named by the program's key in a directory
/// beside the cache's ([`FilterCache::load_record`]), holding the boot id and the program's
/// integrity digest. What the check at
/// create ([`PrecompiledSeccomp`]'s `validate`) finds out depends only on those: the program
/// (EINVAL for one the kernel refuses), the kernel, and the filters already stacked on the
/// init (ENOMEM when their total length is too much), which it inherits from its launcher
/// (the init itself loads none before the check: a precompilable profile has
/// `noNewPrivileges`, set before the check, so `no_new_privs` is no variable either). A launch
/// whose three match a recorded pass skips the check's fork; any other launch checks.
#[derive(Clone, Debug)]
pub struct LoadCheck {
    path: PathBuf,
    contents: Vec<u8>,
}

impl LoadCheck {
    /// The record for `program` (of cache key `key`, recorded as `path`) in this process;
    /// `None` when this process has a filter stacked or the boot cannot be told (then every
    /// launch checks).
    fn new(key: &Digest, program: &[u8], path: &Path) -> Option<LoadCheck> {
        if !no_filter_stacked() {
            return None;
        }
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let contents = format!(
            "{}\n{}\n",
            boot.trim(),
            integrity_digest(key, program).hex()
        )
        .into_bytes();
        Some(LoadCheck {
            path: path.to_owned(),
            contents,
        })
    }

    /// Whether the record is there, unchanged, in the cache's trusted directory.
    fn passed(&self) -> bool {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        read_trusted(dir, &self.path).is_some_and(|bytes| bytes == self.contents)
    }

    /// Records the pass (atomically; a failure only costs the next launch a check). Call it
    /// once a container with this filter was created: its check passed.
    pub fn record(&self) {
        let Some(dir) = self.path.parent() else {
            return;
        };
        if fs::create_dir_all(dir).is_ok() {
            // As the cache's own directory: a record others could have written is never read.
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
            let _ = crate::state::write_atomic(&self.path, &self.contents);
        }
    }
}

/// Whether this process has no seccomp filter (`Seccomp: 0` in `/proc/self/status`); `false`
/// if that cannot be told.
fn no_filter_stacked() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Seccomp:"))
            .is_some_and(|mode| mode.trim() == "0")
    })
}

fn parse_section(section: Value, path: &Path) -> Result<LinuxSeccomp, RuntimeError> {
    serde_json::from_value(section).map_err(|source| RuntimeError::Json {
        path: path.to_owned(),
        source,
    })
}

fn filter_error(path: &Path, reason: String) -> RuntimeError {
    RuntimeError::SeccompFilter {
        path: path.to_owned(),
        reason,
    }
}

/// A compiled filter and the flags it is loaded with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledFilter {
    /// `struct sock_filter` instructions, in the host's byte order.
    pub program: Vec<u8>,
    /// `SECCOMP_FILTER_FLAG_*` of the profile's `flags`.
    pub flags: libc::c_ulong,
}

/// Compiled filters by the hash of what they are compiled from.
#[derive(Debug, Clone)]
pub struct FilterCache {
    dir: PathBuf,
}

impl FilterCache {
    pub fn new(dir: impl Into<PathBuf>) -> FilterCache {
        FilterCache { dir: dir.into() }
    }

    /// Where a pass of the check at create of the program of `key` is recorded
    /// ([`LoadCheck`]): beside the cache's directory (`seccomp.loads/<key>`), so that the
    /// cache's directory holds programs only.
    fn load_record(&self, key: &Digest) -> PathBuf {
        self.dir.with_extension("loads").join(key.hex())
    }

    /// The file that holds the program of `section` on this host.
    pub fn path(&self, section: &LinuxSeccomp) -> Result<PathBuf, RuntimeError> {
        Ok(self.dir.join(format!("{}.bpf", cache_key(section)?.hex())))
    }

    /// The compiled program of `section`: from the cache when its file is intact, else compiled
    /// and written (atomically: concurrent launches each write a whole file, the last rename
    /// wins, and every one of them is the same program).
    pub fn filter(&self, section: &LinuxSeccomp) -> Result<CompiledFilter, RuntimeError> {
        self.filter_and_path(section).map(|(filter, _, _)| filter)
    }

    /// [`FilterCache::filter`], the file it was read from or written to, and its key.
    fn filter_and_path(
        &self,
        section: &LinuxSeccomp,
    ) -> Result<(CompiledFilter, PathBuf, Digest), RuntimeError> {
        let key = cache_key(section)?;
        let path = self.dir.join(format!("{}.bpf", key.hex()));
        let flags = load_flags(section);
        if let Some(bytes) = read_trusted(&self.dir, &path)
            && let Some(program) = verified_program(&key, &bytes)
        {
            let filter = CompiledFilter {
                program: program.to_vec(),
                flags,
            };
            return Ok((filter, path, key));
        }
        let program = compile(section).map_err(|reason| filter_error(&path, reason))?;
        // A cache that cannot be written (a full or read-only disk) costs the next launch a
        // compile, not this launch its start: the program is in hand.
        if fs::create_dir_all(&self.dir).is_ok() {
            // Whatever the umask: a group- or world-writable directory is never read from.
            let _ = fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700));
            let _ = crate::state::write_atomic(&path, &cache_file(&key, &program));
        }
        Ok((CompiledFilter { program, flags }, path, key))
    }
}

/// The bytes of `path` if it and its directory can only have been written by this user: the
/// digest in the file tells damage, not tampering (anyone can compute it), so a file that
/// another user could have replaced (its directory or itself writable by group or others, or
/// owned by someone else) is never loaded; it is compiled again instead.
fn read_trusted(dir: &Path, path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let trusted = |meta: &fs::Metadata| meta.uid() == me && meta.mode() & 0o022 == 0;
    if !trusted(&fs::symlink_metadata(dir).ok()?) {
        return None;
    }
    // The checks and the read on one open file: a rename in between changes nothing.
    let mut file = fs::File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || !trusted(&meta) {
        return None;
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// What the program depends on: the rules, the architecture libseccomp adds as native, and
/// libseccomp's version (its code generator may change between releases).
fn cache_key(section: &LinuxSeccomp) -> Result<Digest, RuntimeError> {
    let rules = serde_json::to_vec(section).map_err(|source| RuntimeError::Json {
        path: PathBuf::from("linux.seccomp"),
        source,
    })?;
    let version = ScmpVersion::current()
        .map(|v| format!("{}.{}.{}", v.major, v.minor, v.micro))
        .unwrap_or_else(|_| "unknown".into());
    let mut input =
        format!("imago seccomp bpf 1\n{:?}\n{version}\n", ScmpArch::native()).into_bytes();
    input.extend_from_slice(&rules);
    Ok(Digest::of(&input))
}

/// Binds a program to its key, so that a file renamed to another profile's name fails too.
fn integrity_digest(key: &Digest, program: &[u8]) -> Digest {
    Digest::of(&[key.hex().as_bytes(), program].concat())
}

fn cache_file(key: &Digest, program: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + program.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(integrity_digest(key, program).hex().as_bytes());
    bytes.extend_from_slice(program);
    bytes
}

/// The program in a cache file, if the file is whole and belongs to `key`.
fn verified_program<'a>(key: &Digest, bytes: &'a [u8]) -> Option<&'a [u8]> {
    let (header, program) = bytes.split_at_checked(HEADER_LEN)?;
    let (magic, digest) = header.split_at(MAGIC.len());
    let whole_instructions = !program.is_empty()
        && program.len() % INSTRUCTION_LEN == 0
        && program.len() / INSTRUCTION_LEN <= MAX_INSTRUCTIONS;
    (magic == MAGIC
        && whole_instructions
        && digest == integrity_digest(key, program).hex().as_bytes())
    .then_some(program)
}

fn load_flags(section: &LinuxSeccomp) -> libc::c_ulong {
    section
        .flags()
        .iter()
        .flatten()
        .map(|flag| match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
            }
        })
        .fold(0, |all, flag| all | flag)
}

/// Compiles `section` to BPF the way libcontainer 0.7 does in its init (`seccomp::
/// initialize_seccomp`: the same actions, architectures, rules skipped when they repeat the
/// default action or name a syscall libseccomp does not know, conditions with a repeated
/// argument index added one by one), except that `SCMP_CMP_MASKED_EQ` takes `value` as the
/// mask and `valueTwo` as the datum, as the OCI runtime spec and runc do (libcontainer takes
/// them the other way round, see `seccomp::swap_masked_operands`).
pub fn compile(section: &LinuxSeccomp) -> Result<Vec<u8>, String> {
    let default_action = action(section.default_action(), section.default_errno_ret())?;
    let mut filter = ScmpFilterContext::new(default_action)
        .map_err(|e| format!("cannot create a libseccomp filter: {e}"))?;
    for &arch in section.architectures().iter().flatten() {
        filter
            .add_arch(architecture(arch))
            .map_err(|e| format!("cannot add architecture {arch:?}: {e}"))?;
    }
    for rule in section.syscalls().iter().flatten() {
        let rule_action = action(rule.action(), rule.errno_ret())?;
        if rule_action == default_action {
            continue;
        }
        let conditions: Vec<ScmpArgCompare> = rule
            .args()
            .iter()
            .flatten()
            .map(|arg| {
                let index = arg.index() as u32;
                match arg.op() {
                    LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpArgCompare::new(
                        index,
                        ScmpCompareOp::MaskedEqual(arg.value()),
                        arg.value_two().unwrap_or(0),
                    ),
                    op => ScmpArgCompare::new(index, compare(op), arg.value()),
                }
            })
            .collect();
        let mut indexes: Vec<u32> = rule
            .args()
            .iter()
            .flatten()
            .map(|a| a.index() as u32)
            .collect();
        indexes.sort_unstable();
        let repeated_index = indexes.windows(2).any(|pair| pair[0] == pair[1]);
        for name in rule.names() {
            // A name this libseccomp does not know is a syscall this kernel does not have
            // either: libcontainer skips it too.
            let Ok(syscall) = ScmpSyscall::from_name(name) else {
                continue;
            };
            let added = if conditions.is_empty() {
                filter.add_rule(rule_action, syscall).map(drop)
            } else if repeated_index {
                conditions.iter().try_for_each(|condition| {
                    filter
                        .add_rule_conditional(rule_action, syscall, std::slice::from_ref(condition))
                        .map(drop)
                })
            } else {
                filter
                    .add_rule_conditional(rule_action, syscall, &conditions)
                    .map(drop)
            };
            added.map_err(|e| format!("cannot add the rule for {name}: {e}"))?;
        }
    }
    let mut exported = tempfile::tempfile()
        .map_err(|e| format!("cannot create a temporary file for the program: {e}"))?;
    filter
        .export_bpf(&exported)
        .map_err(|e| format!("libseccomp cannot export the program: {e}"))?;
    let mut program = Vec::new();
    exported
        .rewind()
        .and_then(|()| exported.read_to_end(&mut program))
        .map_err(|e| format!("cannot read the exported program: {e}"))?;
    Ok(program)
}

fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, String> {
    let errno = errno.map_or(libc::EPERM, |e| e as i32);
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActErrno => ScmpAction::Errno(errno),
        LinuxSeccompAction::ScmpActTrace => ScmpAction::Trace(
            errno
                .try_into()
                .map_err(|_| format!("trace errno {errno} does not fit 16 bits"))?,
        ),
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActNotify => {
            return Err("SCMP_ACT_NOTIFY needs the engine's own seccomp support".into());
        }
    })
}

fn compare(op: LinuxSeccompOperator) -> ScmpCompareOp {
    match op {
        LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
        LinuxSeccompOperator::ScmpCmpLt => ScmpCompareOp::Less,
        LinuxSeccompOperator::ScmpCmpLe => ScmpCompareOp::LessOrEqual,
        LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
        LinuxSeccompOperator::ScmpCmpGe => ScmpCompareOp::GreaterEqual,
        LinuxSeccompOperator::ScmpCmpGt => ScmpCompareOp::Greater,
        LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpCompareOp::MaskedEqual(0),
    }
}

fn architecture(arch: Arch) -> ScmpArch {
    match arch {
        Arch::ScmpArchNative => ScmpArch::Native,
        Arch::ScmpArchX86 => ScmpArch::X86,
        Arch::ScmpArchX86_64 => ScmpArch::X8664,
        Arch::ScmpArchX32 => ScmpArch::X32,
        Arch::ScmpArchArm => ScmpArch::Arm,
        Arch::ScmpArchAarch64 => ScmpArch::Aarch64,
        Arch::ScmpArchMips => ScmpArch::Mips,
        Arch::ScmpArchMips64 => ScmpArch::Mips64,
        Arch::ScmpArchMips64n32 => ScmpArch::Mips64N32,
        Arch::ScmpArchMipsel => ScmpArch::Mipsel,
        Arch::ScmpArchMipsel64 => ScmpArch::Mipsel64,
        Arch::ScmpArchMipsel64n32 => ScmpArch::Mipsel64N32,
        Arch::ScmpArchPpc => ScmpArch::Ppc,
        Arch::ScmpArchPpc64 => ScmpArch::Ppc64,
        Arch::ScmpArchPpc64le => ScmpArch::Ppc64Le,
        Arch::ScmpArchS390 => ScmpArch::S390,
        Arch::ScmpArchS390x => ScmpArch::S390X,
        Arch::ScmpArchRiscv64 => ScmpArch::Riscv64,
        Arch::ScmpArchParisc => ScmpArch::Parisc,
        Arch::ScmpArchParisc64 => ScmpArch::Parisc64,
        Arch::ScmpArchLoongarch64 => ScmpArch::Loongarch64,
        Arch::ScmpArchM68k => ScmpArch::M68k,
        Arch::ScmpArchSh => ScmpArch::Sh,
        Arch::ScmpArchSheb => ScmpArch::Sheb,
    }
}

/// Loads `filter` into the calling thread. Needs `no_new_privs` (or CAP_SYS_ADMIN).
#[allow(unsafe_code)]
pub fn install(filter: &CompiledFilter) -> Result<(), nix::errno::Errno> {
    let len = u16::try_from(filter.program.len() / INSTRUCTION_LEN)
        .map_err(|_| nix::errno::Errno::EINVAL)?;
    // The kernel reads the instructions as `struct sock_filter`; copying them into values of
    // that type keeps their alignment right whatever the Vec<u8>'s is.
    let instructions: Vec<libc::sock_filter> = filter
        .program
        .chunks_exact(INSTRUCTION_LEN)
        .map(|raw| libc::sock_filter {
            code: u16::from_ne_bytes([raw[0], raw[1]]),
            jt: raw[2],
            jf: raw[3],
            k: u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]),
        })
        .collect();
    let program = libc::sock_fprog {
        len,
        filter: instructions.as_ptr().cast_mut(),
    };
    // SAFETY: `program` points at `len` initialised instructions that outlive the call; the
    // kernel copies them and keeps no pointer into our memory.
    let result = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            filter.flags,
            &program as *const libc::sock_fprog,
        )
    };
    nix::errno::Errno::result(result).map(drop)
}

/// libcontainer's executor for an instance with a precompiled filter: checks at create that the
/// kernel takes the filter, then, at start, loads it and execs the program as libcontainer's
/// default executor does.
#[derive(Clone, Debug)]
pub struct PrecompiledSeccomp {
    filter: CompiledFilter,
    /// Which profile the filter is, and its files: for the error when the kernel refuses it.
    profile: String,
    /// The kernel of this boot took this program from a launcher like this one ([`LoadCheck`]):
    /// the check at create is skipped.
    known_loadable: bool,
    /// The record to make once the check at create passed, if it can be made.
    load_check: Option<LoadCheck>,
}

impl PrecompiledSeccomp {
    pub fn filter(&self) -> &CompiledFilter {
        &self.filter
    }

    /// What to record ([`LoadCheck::record`]) once a container with this filter was created;
    /// `None` if nothing is to be recorded (a pass already was, or it cannot be).
    pub fn load_check(&self) -> Option<LoadCheck> {
        self.load_check.clone()
    }

    /// Whether the check at create is skipped for this launch.
    pub fn known_loadable(&self) -> bool {
        self.known_loadable
    }
}

impl Executor for PrecompiledSeccomp {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        install(&self.filter).map_err(|errno| {
            ExecutorError::Other(format!(
                "cannot load the filter compiled from {}: {errno}",
                self.profile
            ))
        })?;
        DefaultExecutor {}.exec(spec)
    }

    /// Called in the container's init before it reports ready, where a failure still fails the
    /// create: the filter itself is loaded only at the exec (after the start signal, as runc
    /// does), so a filter the kernel refuses would otherwise show only after the instance was
    /// reported started.
    /// The check costs a fork and a wait on every launch (1.2-1.4 ms of CPU measured); it is
    /// skipped when the kernel took the same program before under the same conditions
    /// ([`LoadCheck`]).
    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        if !self.known_loadable {
            check_loadable(&self.filter).map_err(|errno| {
                ExecutorValidationError::ArgValidationError(format!(
                    "the kernel refuses the filter compiled from {}: {errno}",
                    self.profile
                ))
            })?;
        }
        DefaultExecutor {}.validate(spec)
    }
}

/// Whether the kernel takes `filter` in this process as it is now (its own filters stacked
/// under it, `no_new_privs`, the limit on their total length): a forked copy loads it and exits,
/// the caller stays unfiltered. `Ok` also when that cannot be told (fork refused, for example by
/// a pids limit): the load before the exec still fails closed.
#[allow(unsafe_code)]
fn check_loadable(filter: &CompiledFilter) -> Result<(), nix::errno::Errno> {
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::ForkResult;
    match crate::supervisor::fork_single_threaded() {
        Ok(ForkResult::Child) => {
            let code = match install(filter) {
                Ok(()) => 0,
                Err(errno) => errno as i32,
            };
            // SAFETY: _exit ends the forked copy at once, running no destructor or atexit
            // handler of the state it shares with its parent.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, 0)) => return Ok(()),
                Ok(WaitStatus::Exited(_, errno)) => {
                    return Err(nix::errno::Errno::from_raw(errno));
                }
                Err(nix::errno::Errno::EINTR) => continue,
                // Killed: loaded, then killed by it (its own exit denied); or cannot be told.
                _ => return Ok(()),
            }
        },
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::{Engine, Seccomp};

    fn default_section() -> LinuxSeccomp {
        let section = Seccomp::Default.oci_section(Engine::Runc).unwrap().unwrap();
        serde_json::from_value(section).unwrap()
    }

    /// Starts `sleep` with a filter loaded by `load` in the child just before its exec, and
    /// reads the loaded program back from the kernel (PTRACE_SECCOMP_GET_FILTER: root only).
    #[allow(unsafe_code)]
    fn loaded_program(load: impl Fn() -> std::io::Result<()> + Send + Sync + 'static) -> Vec<u8> {
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new("sleep");
        command.arg("10");
        // SAFETY: the closure runs in the forked child; it only sets no_new_privs and loads a
        // filter (the allocations libseccomp makes are safe after fork with glibc's malloc).
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                load()
            });
        }
        let mut child = command.spawn().unwrap();
        let pid = child.id() as libc::pid_t;
        // SAFETY: plain ptrace requests on our own child; `buf` holds up to 4096 instructions.
        let program = unsafe {
            assert_eq!(libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0), 0, "seize");
            assert_eq!(
                libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0),
                0,
                "interrupt"
            );
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            let mut buf = vec![
                libc::sock_filter {
                    code: 0,
                    jt: 0,
                    jf: 0,
                    k: 0
                };
                MAX_INSTRUCTIONS
            ];
            let count = libc::ptrace(
                0x420c, /* PTRACE_SECCOMP_GET_FILTER */
                pid,
                0,
                buf.as_mut_ptr(),
            );
            assert!(
                count > 0,
                "PTRACE_SECCOMP_GET_FILTER needs root: {}",
                std::io::Error::last_os_error()
            );
            buf.truncate(count as usize);
            buf
        };
        let _ = child.kill();
        let _ = child.wait();
        program
            .iter()
            .flat_map(|i| {
                [
                    &i.code.to_ne_bytes()[..],
                    &[i.jt, i.jf],
                    &i.k.to_ne_bytes()[..],
                ]
                .concat()
            })
            .collect()
    }

    /// The promise: an instance of the embedded engine runs under exactly the program
    /// libcontainer would have compiled and loaded from the same bundle, for every
    /// architecture the profile names (the program holds them all).
    #[test]
    fn the_precompiled_program_is_the_one_libcontainer_loads() {
        for seccomp in [
            Seccomp::Default,
            Seccomp::from_profile(serde_json::json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "syscalls": [
                    {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 122},
                    {"names": ["personality"], "action": "SCMP_ACT_ERRNO",
                     "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_NE"},
                              {"index": 0, "value": 0, "op": "SCMP_CMP_NE"}]},
                    {"names": ["kill"], "action": "SCMP_ACT_KILL_PROCESS"},
                ],
            }))
            .unwrap(),
        ] {
            let embedded = seccomp.oci_section(Engine::Embedded).unwrap().unwrap();
            let libcontainer_section: LinuxSeccomp = serde_json::from_value(embedded).unwrap();
            let by_libcontainer = loaded_program(move || {
                libcontainer::seccomp::initialize_seccomp(&libcontainer_section)
                    .map(drop)
                    .map_err(std::io::Error::other)
            });
            let oci = seccomp.oci_section(Engine::Runc).unwrap().unwrap();
            let section: LinuxSeccomp = serde_json::from_value(oci).unwrap();
            let compiled = CompiledFilter {
                program: compile(&section).unwrap(),
                flags: load_flags(&section),
            };
            assert!(by_libcontainer.len() > 20 * INSTRUCTION_LEN, "{seccomp:?}");
            assert_eq!(compiled.program, by_libcontainer, "{seccomp:?}");
            let by_imago = loaded_program(move || install(&compiled).map_err(std::io::Error::from));
            assert_eq!(by_imago, by_libcontainer, "{seccomp:?}");
        }
    }

    #[test]
    fn a_cache_file_is_only_accepted_whole_and_for_its_own_key() {
        let section = default_section();
        let key = cache_key(&section).unwrap();
        let program = compile(&section).unwrap();
        assert!(program.len() > 100 * INSTRUCTION_LEN, "{}", program.len());
        let file = cache_file(&key, &program);
        assert_eq!(verified_program(&key, &file), Some(program.as_slice()));
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(verified_program(&key, &flipped), None);
        assert_eq!(verified_program(&key, &file[..file.len() - 8]), None);
        assert_eq!(verified_program(&key, &file[..HEADER_LEN]), None);
        assert_eq!(verified_program(&key, &file[..10]), None);
        let other = Digest::of(b"another profile");
        assert_eq!(verified_program(&other, &file), None);
    }

    #[test]
    fn the_key_changes_with_the_rules() {
        let mut section = default_section();
        let before = cache_key(&section).unwrap();
        assert_eq!(before, cache_key(&section).unwrap());
        section.set_default_errno_ret(Some(38));
        assert_ne!(before, cache_key(&section).unwrap());
    }

    #[test]
    fn notify_profiles_and_bundles_without_no_new_privileges_stay_with_the_engine() {
        let section = default_section();
        assert!(precompilable(&section, true));
        assert!(!precompilable(&section, false));
        let notify: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}],
        }))
        .unwrap();
        assert!(!precompilable(&notify, true));
        let mut config = serde_json::json!({
            "process": {"noNewPrivileges": true},
            "annotations": {"a": "b"},
            "linux": {"seccomp": serde_json::to_value(&notify).unwrap()},
        });
        assert_eq!(take_precompilable(&mut config, false).unwrap(), None);
        assert!(config.pointer("/linux/seccomp").is_some());
    }

    #[test]
    fn a_precompiled_section_leaves_config_json_in_the_oci_operand_order_and_marks_it() {
        let embedded = Seccomp::Default.oci_section(Engine::Embedded).unwrap();
        let oci = Seccomp::Default.oci_section(Engine::Runc).unwrap();
        assert_ne!(embedded, oci, "the default profile has a masked comparison");
        let mut config = serde_json::json!({
            "process": {"noNewPrivileges": true},
            "annotations": {"a": "b"},
            "linux": {"seccomp": embedded},
        });
        assert_eq!(take_precompilable(&mut config, true).unwrap(), oci);
        assert_eq!(config.pointer("/linux/seccomp"), None);
        assert_eq!(
            config.pointer(&format!("/annotations/{ANNOTATION}")),
            Some(&Value::from(PRECOMPILED))
        );
        assert_eq!(
            config.pointer(&format!("/annotations/{PROFILE_ANNOTATION}")),
            Some(&Value::from(DEFAULT_PROFILE))
        );
        assert_eq!(config.pointer("/annotations/a"), Some(&Value::from("b")));
    }

    /// The check at create is skipped only for the very program a recorded pass was made
    /// with, under this boot, from a record nobody else could have written.
    #[test]
    fn a_recorded_load_check_holds_only_for_its_program_and_boot() {
        assert!(no_filter_stacked(), "the test process has a seccomp filter");
        let dir = tempfile::tempdir().unwrap();
        let cache = FilterCache::new(dir.path().join("seccomp"));
        let section = default_section();
        let filter = cache.filter(&section).unwrap();
        let key = cache_key(&section).unwrap();
        let record = cache.load_record(&key);
        let check = LoadCheck::new(&key, &filter.program, &record).unwrap();
        assert!(!check.passed(), "passed before anything was recorded");
        check.record();
        assert!(check.passed());
        assert_eq!(
            fs::metadata(record.parent().unwrap())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        // The program in the cache replaced by another one under the same key.
        let mut other = filter.program.clone();
        other[0] ^= 1;
        assert!(!LoadCheck::new(&key, &other, &record).unwrap().passed());
        // A record of another boot.
        let contents = fs::read_to_string(&record).unwrap();
        let (boot, digest) = contents.split_once('\n').unwrap();
        let other_boot = format!("{}x\n{digest}", &boot[..boot.len() - 1]);
        fs::write(&record, other_boot).unwrap();
        assert!(!check.passed(), "a record of another boot was trusted");
        // A record others could have written.
        check.record();
        assert!(check.passed());
        fs::set_permissions(&record, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(!check.passed(), "a world-writable record was trusted");
        // An executor for a bundle whose program passed skips the check; one whose did not
        // carries the record to make.
        fs::set_permissions(&record, fs::Permissions::from_mode(0o600)).unwrap();
        let bundle = dir.path().join("bundle");
        fs::create_dir(&bundle).unwrap();
        let marked = serde_json::json!({"annotations": {ANNOTATION: PRECOMPILED}});
        fs::write(bundle.join("config.json"), marked.to_string()).unwrap();
        fs::write(
            bundle.join(BUNDLE_FILE),
            serde_json::to_string(&section).unwrap(),
        )
        .unwrap();
        let executor = bundle_filter(&bundle, &cache).unwrap().unwrap();
        assert!(executor.known_loadable());
        assert!(executor.load_check().is_none());
        fs::remove_file(&record).unwrap();
        let executor = bundle_filter(&bundle, &cache).unwrap().unwrap();
        assert!(!executor.known_loadable());
        executor.load_check().unwrap().record();
        assert!(
            bundle_filter(&bundle, &cache)
                .unwrap()
                .unwrap()
                .known_loadable()
        );
    }

    /// A bundle marked precompiled whose rules are gone must not start unfiltered.
    #[test]
    fn a_marked_bundle_without_its_rules_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FilterCache::new(dir.path().join("seccomp"));
        let config = dir.path().join("config.json");
        fs::write(&config, r#"{"annotations": {"a": "b"}}"#).unwrap();
        assert!(bundle_filter(dir.path(), &cache).unwrap().is_none());
        let marked = serde_json::json!({"annotations": {ANNOTATION: PRECOMPILED}});
        fs::write(&config, marked.to_string()).unwrap();
        let err = bundle_filter(dir.path(), &cache).unwrap_err().to_string();
        assert!(err.contains(BUNDLE_FILE), "{err}");
        let rules = serde_json::to_string(&default_section()).unwrap();
        fs::write(dir.path().join(BUNDLE_FILE), rules).unwrap();
        let executor = bundle_filter(dir.path(), &cache).unwrap().unwrap();
        assert_eq!(
            executor.filter().program,
            compile(&default_section()).unwrap()
        );
        let odd = serde_json::json!({"annotations": {ANNOTATION: "later"}});
        fs::write(&config, odd.to_string()).unwrap();
        let err = bundle_filter(dir.path(), &cache).unwrap_err().to_string();
        assert!(err.contains("later"), "{err}");
    }

    /// The digest tells damage, not forgery: an allow-all program under a header computed for
    /// it is "valid", so only a file nobody else could have written is loaded.
    #[test]
    fn a_cache_file_others_could_have_written_is_never_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FilterCache::new(dir.path().join("seccomp"));
        let section = default_section();
        let real = cache.filter(&section).unwrap();
        let path = cache.path(&section).unwrap();
        let dir_mode = fs::metadata(dir.path().join("seccomp"))
            .unwrap()
            .permissions();
        assert_eq!(dir_mode.mode() & 0o777, 0o700);
        let key = cache_key(&section).unwrap();
        let allow_all: Vec<u8> = [
            0x06u16.to_ne_bytes().as_slice(),
            &[0, 0],
            &0x7fff_0000u32.to_ne_bytes(),
        ]
        .concat();
        let forged = cache_file(&key, &allow_all);
        assert_eq!(verified_program(&key, &forged), Some(allow_all.as_slice()));
        for (file_mode, dir_mode) in [
            (0o664, 0o700),
            (0o646, 0o700),
            (0o644, 0o770),
            (0o644, 0o703),
        ] {
            fs::write(&path, &forged).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(file_mode)).unwrap();
            fs::set_permissions(
                dir.path().join("seccomp"),
                fs::Permissions::from_mode(dir_mode),
            )
            .unwrap();
            let loaded = cache.filter(&section).unwrap();
            assert_eq!(
                loaded.program, real.program,
                "file {file_mode:o}, dir {dir_mode:o}"
            );
        }
        // Written by this user alone, the same forged file would be believed: the check is
        // what keeps it out, not the digest.
        fs::set_permissions(
            dir.path().join("seccomp"),
            fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        fs::write(&path, &forged).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(cache.filter(&section).unwrap().program, allow_all);
    }

    #[test]
    fn a_damaged_cache_file_is_replaced_by_a_fresh_compile() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FilterCache::new(dir.path().join("seccomp"));
        let section = default_section();
        let first = cache.filter(&section).unwrap();
        let path = cache.path(&section).unwrap();
        let good = fs::read(&path).unwrap();
        // A whole, valid program that allows everything (BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        // under the old header: loading it would drop the filter silently.
        let mut allow_all = good[..HEADER_LEN].to_vec();
        allow_all.extend_from_slice(&0x06u16.to_ne_bytes());
        allow_all.extend_from_slice(&[0, 0]);
        allow_all.extend_from_slice(&0x7fff_0000u32.to_ne_bytes());
        for damaged in [allow_all, good[..good.len() - 8].to_vec(), Vec::new()] {
            fs::write(&path, &damaged).unwrap();
            assert_eq!(cache.filter(&section).unwrap(), first);
            assert_eq!(fs::read(&path).unwrap(), good);
        }
    }
}
