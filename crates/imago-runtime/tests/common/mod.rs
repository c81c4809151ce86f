//! Shared harness: a busybox OCI image built from /bin/busybox, an image source reading an OCI
//! layout, and a provider on a temporary home.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use imago_oci::Digest;
use imago_oci::spec::{Descriptor, ImageConfiguration, ImageManifest};
use imago_runtime::{
    Engine, ImageInfo, ImageSource, Instance, InstanceSpec, LocalProvider, Provider, RuntimeError,
    Status, SupervisorCommand,
};
use serde_json::json;

pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "httpd", "ip", "mount", "touch", "head", "tr", "ls", "id",
    "true", "false", "wget", "unshare", "mkdir",
];

/// An OCI image layout on disk (just the blobs directory).
pub struct LayoutSource {
    pub root: PathBuf,
}

impl LayoutSource {
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }
    fn write_blob(&self, bytes: &[u8]) -> (Digest, u64) {
        let d = Digest::of(bytes);
        fs::create_dir_all(self.root.join("blobs/sha256")).unwrap();
        fs::write(self.blob_path(&d), bytes).unwrap();
        (d, bytes.len() as u64)
    }
}

impl ImageSource for LayoutSource {
    fn image(&self, digest: &Digest) -> Result<ImageInfo, RuntimeError> {
        let bytes = fs::read(self.blob_path(digest)).map_err(|e| RuntimeError::ImageNotFound {
            digest: digest.clone(),
            reason: e.to_string(),
        })?;
        let manifest: ImageManifest = serde_json::from_slice(&bytes).unwrap();
        let config_digest = Digest::try_from(manifest.config().digest()).unwrap();
        let config: ImageConfiguration =
            serde_json::from_slice(&fs::read(self.blob_path(&config_digest)).unwrap()).unwrap();
        Ok(ImageInfo {
            config,
            layers: manifest.layers().clone(),
        })
    }

    fn open_layer(
        &self,
        _image: &Digest,
        layer: &Descriptor,
    ) -> Result<Box<dyn Read + '_>, RuntimeError> {
        let d = Digest::try_from(layer.digest()).unwrap();
        let f = fs::File::open(self.blob_path(&d)).unwrap();
        Ok(Box::new(f))
    }
}

/// Builds the busybox test image into `layout`; returns its manifest digest and layer digest.
pub fn build_busybox_image(layout: &LayoutSource) -> (Digest, Digest) {
    build_busybox_image_with(layout, &[])
}

/// The busybox test image, declaring `volumes` in its config.
pub fn build_busybox_image_with(layout: &LayoutSource, volumes: &[&str]) -> (Digest, Digest) {
    build_busybox_image_full(layout, volumes, None, &[])
}

/// The busybox test image, declaring `volumes`, running as `user` (the image config's `User`)
/// and holding `extra` files (path in the image, mode, content) beside busybox.
pub fn build_busybox_image_full(
    layout: &LayoutSource,
    volumes: &[&str],
    user: Option<&str>,
    extra: &[(&str, u32, Vec<u8>)],
) -> (Digest, Digest) {
    let mut tar = tar::Builder::new(Vec::new());
    let dir = |tar: &mut tar::Builder<Vec<u8>>, path: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        tar.append_data(&mut h, path, std::io::empty()).unwrap();
    };
    for d in ["bin", "etc", "www"] {
        dir(&mut tar, d);
    }
    let busybox =
        fs::read("/bin/busybox").expect("busybox-static must be installed at /bin/busybox");
    let file = |tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        tar.append_data(&mut h, path, data).unwrap();
    };
    file(&mut tar, "bin/busybox", 0o755, &busybox);
    file(
        &mut tar,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    );
    file(
        &mut tar,
        "etc/group",
        0o644,
        b"root:x:0:\nnobody:x:65534:\n",
    );
    file(&mut tar, "www/index.html", 0o644, b"hello from imago\n");
    for (path, mode, data) in extra {
        file(&mut tar, path, *mode, data);
    }
    for applet in APPLETS {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    let tar_bytes = tar.into_inner().unwrap();
    let diff_id = Digest::of(&tar_bytes);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar_bytes).unwrap();
    let gz_bytes = gz.finish().unwrap();
    let (layer_digest, layer_size) = layout.write_blob(&gz_bytes);
    let mut config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "GREETING=from-image"],
            "Cmd": ["sh"],
            "WorkingDir": "/",
            "ExposedPorts": {"80/tcp": {}},
            "Volumes": volumes.iter().map(|v| (v.to_string(), json!({}))).collect::<serde_json::Map<_, _>>(),
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
    });
    if let Some(user) = user {
        config["config"]["User"] = json!(user);
    }
    let (config_digest, config_size) = layout.write_blob(&serde_json::to_vec(&config).unwrap());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest.to_string(), "size": layer_size}],
    });
    let (manifest_digest, _) = layout.write_blob(&serde_json::to_vec(&manifest).unwrap());
    (manifest_digest, layer_digest)
}

pub struct Harness {
    pub tmp: tempfile::TempDir,
    pub image: Digest,
    pub layer: Digest,
    pub provider: LocalProvider,
    pub engine: Engine,
}

pub fn supervisor_command() -> SupervisorCommand {
    SupervisorCommand {
        program: PathBuf::from(env!("CARGO_BIN_EXE_imago-runtime-supervisor")),
        args: vec![],
        fork_when_single_threaded: false,
    }
}

/// A test that fails half-way must not leave its instances running on the host (a busy loop
/// of a failed CPU-limit test once spun for half an hour): whatever the harness's provider still
/// lists is stopped and removed, errors ignored because the test has already said what failed.
impl Drop for Harness {
    fn drop(&mut self) {
        let Ok(left) = self.provider.list() else {
            return;
        };
        for instance in left {
            let _ = self.provider.stop(&instance.id, Duration::from_secs(1));
            let _ = self.provider.remove(&instance.id);
        }
    }
}

impl Harness {
    pub fn new(engine: Engine) -> Harness {
        Harness::with_image_volumes(engine, &[])
    }

    /// A harness whose busybox image declares `volumes`.
    pub fn with_image_volumes(engine: Engine, volumes: &[&str]) -> Harness {
        Harness::with_image(engine, |layout| build_busybox_image_with(layout, volumes))
    }

    /// A harness whose image is made by `build` in the harness's layout.
    pub fn with_image(
        engine: Engine,
        build: impl FnOnce(&LayoutSource) -> (Digest, Digest),
    ) -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let layout = LayoutSource {
            root: tmp.path().join("layout"),
        };
        let (image, layer) = build(&layout);
        let provider = LocalProvider::new(
            &tmp.path().join("home"),
            Box::new(layout),
            supervisor_command(),
        );
        Harness {
            tmp,
            image,
            layer,
            provider,
            engine,
        }
    }

    pub fn home(&self) -> PathBuf {
        self.tmp.path().join("home")
    }

    pub fn layout(&self) -> LayoutSource {
        LayoutSource {
            root: self.tmp.path().join("layout"),
        }
    }

    pub fn spec(&self, args: &[&str]) -> InstanceSpec {
        let mut s = InstanceSpec::new(self.image.clone());
        s.engine = self.engine;
        s.args = Some(args.iter().map(|a| a.to_string()).collect());
        s
    }

    /// Launches and waits for the instance to exit on its own.
    pub fn run_to_exit(&self, spec: &InstanceSpec) -> Instance {
        let inst = self.provider.launch(spec).unwrap();
        self.wait_exit(&inst.id, Duration::from_secs(20))
    }

    pub fn wait_exit(&self, id: &str, timeout: Duration) -> Instance {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let i = self.provider.inspect(id).unwrap();
            if i.status != Status::Running && i.status != Status::Created {
                return i;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "instance {id} still {} after {timeout:?}",
                i.status
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn logs(&self, id: &str) -> String {
        String::from_utf8_lossy(&self.provider.logs(id).unwrap()).into_owned()
    }
}

/// A digest of every path, mode, size and content under `root` (to prove it is unchanged).
pub fn tree_digest(root: &Path) -> Digest {
    let mut entries = Vec::new();
    walk(root, root, &mut entries);
    entries.sort();
    Digest::of(entries.join("\n").as_bytes())
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    use std::os::unix::fs::MetadataExt;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let m = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let content = if m.is_file() {
            Digest::of(&fs::read(&p).unwrap()).to_string()
        } else if m.file_type().is_symlink() {
            fs::read_link(&p).unwrap().display().to_string()
        } else {
            String::new()
        };
        out.push(format!(
            "{rel} {:o} {} {} {content}",
            m.mode(),
            m.len(),
            m.mtime()
        ));
        if m.is_dir() {
            walk(root, &p, out);
        }
    }
}
