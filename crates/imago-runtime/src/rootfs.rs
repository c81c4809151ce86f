//! The rootfs cache: each image digest is unpacked once into `<home>/rootfs/<manifest-hex>` and
//! shared read-only by every instance of that digest.
//!
//! Invariants: an entry exists only once it is complete (it is unpacked into a temporary directory
//! and renamed into place); every layer blob is checked against its digest and size and every
//! uncompressed layer against the config's diff_id before the rename (entries are applied by
//! imago-layer's safe unpacker, which never writes outside the target); an entry is never written
//! after the rename. Concurrent launches of one digest serialize on a lock file; the next unpack
//! of a digest (under that lock), or a sweep that gets that lock at once, removes the temporary
//! trees its killed unpacks left (older imagos' too, named by a prefix of the digest: with the
//! lock of every digest of that prefix).

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use imago_layer::compression::{Compression, decompress};
use imago_layer::unpack::{UnpackOptions, apply_layer};
use imago_oci::spec::{Descriptor, ImageConfiguration};
use imago_oci::{Digest, HashingReader};
use nix::fcntl::{Flock, FlockArg};

use crate::RuntimeError;

/// An image as the runtime needs it: its config and its layers, bottom first.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub config: ImageConfiguration,
    pub layers: Vec<Descriptor>,
}

/// Where images come from (the store, in production; anything in tests).
pub trait ImageSource: Send + Sync {
    /// The image whose manifest has `digest`.
    fn image(&self, digest: &Digest) -> Result<ImageInfo, RuntimeError>;
    /// The (compressed) bytes of one layer blob. The cache verifies digest and size itself.
    fn open_layer(
        &self,
        image: &Digest,
        layer: &Descriptor,
    ) -> Result<Box<dyn Read + '_>, RuntimeError>;
}

/// How many hex digits of the digest older imagos named an unpack's temporary tree by
/// (`.tmp-<short>-`, [`Digest::short`]).
const OLDER_PREFIX_HEX: usize = 12;

/// Directories every rootfs gets, so the runtime never has to create a mount point inside the
/// shared (and read-only) tree.
const MOUNT_POINTS: &[&str] = &["proc", "sys", "dev", "tmp", "run", "etc"];

#[derive(Debug, Clone)]
pub struct RootfsCache {
    dir: PathBuf,
}

impl RootfsCache {
    pub fn new(dir: impl Into<PathBuf>) -> RootfsCache {
        RootfsCache { dir: dir.into() }
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Takes the entry of `digest` for itself until the returned lock is dropped: held while
    /// the entry is unpacked into place and while it is set aside, so neither can interleave
    /// with the other (a set-aside decided on an old tree must not move a fresh one).
    pub fn lock_entry(&self, digest: &Digest) -> Result<Flock<File>, RuntimeError> {
        fs::create_dir_all(&self.dir).map_err(RuntimeError::io("cannot create", &self.dir))?;
        let (lock_path, lock_file) = self.open_lock_file(digest);
        let lock_file = lock_file.map_err(RuntimeError::io("cannot open", &lock_path))?;
        Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| RuntimeError::Io {
            action: "cannot lock",
            path: lock_path,
            source: e.into(),
        })
    }

    /// The lock file of `digest`'s entry, opened (made if missing), and its path.
    fn open_lock_file(&self, digest: &Digest) -> (PathBuf, io::Result<File>) {
        let lock_path = self.dir.join(format!(".{}.lock", digest.hex()));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path);
        (lock_path, file)
    }

    /// The name prefix of `digest`'s temporary trees while it is unpacked: the whole digest,
    /// so that no other digest's unpack under way (under its own lock) ever matches it.
    fn unpack_prefix(digest: &Digest) -> String {
        format!(".tmp-{}-", digest.hex())
    }

    /// Removes the temporary trees that unpacks of `digest` killed midway left (a disk leak,
    /// never a wrong entry: the tree is renamed into place only when whole). Called with the
    /// entry's lock held. How many it removed.
    fn remove_killed_unpacks_of(&self, digest: &Digest) -> usize {
        let prefix = Self::unpack_prefix(digest);
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .filter(|e| fs::remove_dir_all(e.path()).is_ok())
            .count()
    }

    /// [`Self::remove_killed_unpacks_of`] for every digest with a temporary tree whose entry
    /// lock is free at once (a held lock is an unpack under way, or a set-aside: left for the
    /// next sweep): the trees of digests that are never unpacked again. How many it removed.
    /// Also takes the trees that older imagos' unpacks killed midway left
    /// ([`Self::remove_older_killed_unpacks`]).
    pub fn remove_killed_unpacks(&self) -> usize {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut digests = std::collections::BTreeSet::new();
        let mut older = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_prefix(".tmp-").and_then(|r| r.split('-').next()) else {
                continue;
            };
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            if hex.len() == 64 {
                digests.insert(hex.to_owned());
            } else if hex.len() == OLDER_PREFIX_HEX {
                older.push((hex.to_owned(), entry.path()));
            }
        }
        let removed: usize = digests
            .iter()
            .filter_map(|hex| format!("sha256:{hex}").parse::<Digest>().ok())
            .map(|digest| match self.try_lock_entry(&digest) {
                Some(_lock) => self.remove_killed_unpacks_of(&digest),
                None => 0,
            })
            .sum();
        removed + self.remove_older_killed_unpacks(&older)
    }

    /// The entry lock of `digest` if it is free at once (made if missing, as by
    /// [`Self::lock_entry`]); `None` if held (an unpack or a set-aside under way) or unusable.
    fn try_lock_entry(&self, digest: &Digest) -> Option<Flock<File>> {
        let file = self.open_lock_file(digest).1.ok()?;
        Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()
    }

    /// Removes the temporary trees `.tmp-<short>-*` (`trees`, by `short`) that older imagos'
    /// unpacks killed midway left: their tree was named by the digest's first
    /// [`OLDER_PREFIX_HEX`] hex digits until the whole digest named it, and no unpack ever
    /// removed them. Older imagos unpacked under the same lock as this one (`.<hex>.lock`, made
    /// before the tree, never removed), so a tree of `short` is taken only with the lock of
    /// every digest that starts with `short` taken at once, from a listing made after the tree
    /// was seen (which holds its digest's lock file, made before it): an older unpack under way
    /// holds one of them. With none of them (no lock file at all) nothing can be unpacking it.
    /// How many it removed.
    fn remove_older_killed_unpacks(&self, trees: &[(String, PathBuf)]) -> usize {
        if trees.is_empty() {
            return 0;
        }
        let shorts: std::collections::BTreeSet<&str> =
            trees.iter().map(|(short, _)| short.as_str()).collect();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let locks: Vec<Digest> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let hex = name.strip_prefix('.')?.strip_suffix(".lock")?;
                let short = hex.get(..OLDER_PREFIX_HEX)?;
                if !shorts.contains(short) {
                    return None;
                }
                format!("sha256:{hex}").parse::<Digest>().ok()
            })
            .collect();
        shorts
            .iter()
            .map(|short| {
                let candidates = locks.iter().filter(|d| d.hex().starts_with(short));
                let held: Option<Vec<Flock<File>>> =
                    candidates.map(|d| self.try_lock_entry(d)).collect();
                let Some(_held) = held else {
                    return 0;
                };
                trees
                    .iter()
                    .filter(|(of, path)| of == short && fs::remove_dir_all(path).is_ok())
                    .count()
            })
            .sum()
    }

    /// Returns the unpacked rootfs of `digest`, unpacking it first if needed.
    pub fn ensure(
        &self,
        source: &dyn ImageSource,
        digest: &Digest,
        image: &ImageInfo,
    ) -> Result<PathBuf, RuntimeError> {
        let target = self.path(digest);
        if target.is_dir() {
            return Ok(target);
        }
        let _lock = self.lock_entry(digest)?;
        if target.is_dir() {
            // Another launch finished the unpack while we waited for the lock.
            return Ok(target);
        }
        // An unpack of this digest killed midway left its temporary tree: nothing else can be
        // unpacking this digest while the entry's lock is held, so every such tree is garbage.
        self.remove_killed_unpacks_of(digest);
        let tmp = tempfile::Builder::new()
            .prefix(&Self::unpack_prefix(digest))
            .tempdir_in(&self.dir)
            .map_err(RuntimeError::io(
                "cannot create a temporary directory in",
                &self.dir,
            ))?;
        unpack_image(source, digest, image, tmp.path())?;
        for dir in MOUNT_POINTS {
            let p = tmp.path().join(dir);
            if fs::symlink_metadata(&p).is_err() {
                fs::create_dir(&p).map_err(RuntimeError::io("cannot create", &p))?;
            }
        }
        // runc gives a tmpfs the mode of the directory it is mounted on, not the `mode=` of
        // its options: the mount points of the instance's own tmpfs mounts get those modes
        // (/tmp 1777), so that /tmp is writable for any user under both engines. What the
        // image had there is hidden under the tmpfs anyway.
        for (target, mode) in crate::bundle::TMPFS_MOUNTS {
            let p = tmp.path().join(target.trim_start_matches('/'));
            let mode = u32::from_str_radix(mode, 8).unwrap_or(0o755);
            if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                set_mode(&p, mode)?;
            }
        }
        // So that instances can mount volumes there without writing into the shared tree.
        for volume in crate::volumes::declared_volumes(&image.config) {
            crate::volumes::create_mount_point(tmp.path(), &volume)?;
        }
        // The root of the tree is what instances see as `/`.
        set_mode(tmp.path(), 0o755)?;
        // The drift baseline is taken from the verified tree while nothing else can see it, and
        // written before the tree appears, so a drift check never finds the entry without it.
        // Failing to record it does not fail the launch (the tree is complete and verified): the
        // drift check reports an entry without a manifest as unverifiable, which sets it aside
        // and replaces its instances, rather than trusting whatever the tree holds by then.
        self.record_manifest_of(digest, tmp.path());
        let tmp_path = tmp.keep();
        fs::rename(&tmp_path, &target).map_err(|e| {
            let _ = fs::remove_dir_all(&tmp_path);
            RuntimeError::Io {
                action: "cannot rename into place",
                path: target.clone(),
                source: e,
            }
        })?;
        Ok(target)
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), RuntimeError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(RuntimeError::io("cannot chmod", path))
}

fn unpack_image(
    source: &dyn ImageSource,
    digest: &Digest,
    image: &ImageInfo,
    root: &Path,
) -> Result<(), RuntimeError> {
    let diff_ids = image.config.rootfs().diff_ids();
    if diff_ids.len() != image.layers.len() {
        return Err(RuntimeError::InvalidImage {
            digest: digest.clone(),
            reason: format!(
                "the manifest lists {} layers but the config lists {} diff_ids",
                image.layers.len(),
                diff_ids.len()
            ),
        });
    }
    for (layer, diff_id) in image.layers.iter().zip(diff_ids) {
        let layer_digest =
            Digest::try_from(layer.digest()).map_err(|e| RuntimeError::InvalidImage {
                digest: digest.clone(),
                reason: format!("layer digest {}: {e}", layer.digest()),
            })?;
        let corrupt = |reason: String| RuntimeError::CorruptLayer {
            image: digest.clone(),
            layer: layer_digest.clone(),
            reason,
        };
        let compression = Compression::from_media_type(layer.media_type().to_string().as_str())
            .ok_or_else(|| {
                corrupt(format!(
                    "unsupported layer media type {}",
                    layer.media_type()
                ))
            })?;
        let blob = source.open_layer(digest, layer)?;
        let mut compressed = HashingReader::new(blob);
        let (actual_diff_id, _) = {
            let decompressed =
                decompress(compression, &mut compressed).map_err(|e| corrupt(e.to_string()))?;
            let mut tar_stream = HashingReader::new(decompressed);
            let options = UnpackOptions {
                preserve_ownership: true,
                skip_devices: false,
            };
            apply_layer(&mut tar_stream, root, &options)
                .map_err(|e| corrupt(format!("cannot unpack: {e}")))?;
            io::copy(&mut tar_stream, &mut io::sink()).map_err(|e| corrupt(e.to_string()))?;
            let (d, n, _) = tar_stream.finish();
            (d, n)
        };
        io::copy(&mut compressed, &mut io::sink()).map_err(|e| corrupt(e.to_string()))?;
        let (blob_digest, blob_size, _) = compressed.finish();
        if blob_digest != layer_digest || blob_size != layer.size() {
            return Err(corrupt(format!(
                "blob content is {blob_digest} ({blob_size} bytes), expected {layer_digest} ({} bytes)",
                layer.size()
            )));
        }
        let expected: Digest = diff_id.parse().map_err(|e| RuntimeError::InvalidImage {
            digest: digest.clone(),
            reason: format!("invalid diff_id {diff_id}: {e}"),
        })?;
        if actual_diff_id != expected {
            return Err(corrupt(format!(
                "uncompressed content is {actual_diff_id}, the config's diff_id is {expected}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image of no layers: its rootfs is the mount points alone.
    struct Empty;

    impl ImageSource for Empty {
        fn image(&self, _: &Digest) -> Result<ImageInfo, RuntimeError> {
            Ok(empty_image())
        }
        fn open_layer(
            &self,
            _: &Digest,
            _: &Descriptor,
        ) -> Result<Box<dyn Read + '_>, RuntimeError> {
            unreachable!("an image of no layers has no layer to open")
        }
    }

    /// The names of the temporary trees in the cache directory `dir`.
    fn temporary_trees(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-"))
            .collect()
    }

    fn empty_image() -> ImageInfo {
        ImageInfo {
            config: serde_json::from_value(serde_json::json!({
                "architecture": "amd64", "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": []}
            }))
            .unwrap(),
            layers: Vec::new(),
        }
    }

    #[test]
    fn an_unpack_takes_what_killed_unpacks_of_its_digest_left_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RootfsCache::new(dir.path());
        let digest = Digest::of(b"image");
        let other = Digest::of(b"other image");
        // What an unpack killed midway leaves: a partial tree under its temporary name, one of
        // this digest (twice: two killed launches) and one of another digest, whose unpack may
        // be under way under its own lock.
        let killed = |d: &Digest, n: u32| {
            let tree = dir
                .path()
                .join(format!("{}{n}", RootfsCache::unpack_prefix(d)));
            fs::create_dir_all(tree.join("usr/lib")).unwrap();
            fs::write(tree.join("usr/lib/partial"), b"half a file").unwrap();
            tree
        };
        let (mine, mine_too, theirs) = (killed(&digest, 1), killed(&digest, 2), killed(&other, 1));
        let root = cache.ensure(&Empty, &digest, &empty_image()).unwrap();
        assert_eq!(root, cache.path(&digest));
        assert!(root.join("proc").is_dir(), "the entry is whole");
        assert!(
            !mine.exists() && !mine_too.exists(),
            "killed unpacks of the digest left"
        );
        assert!(
            theirs.join("usr/lib/partial").exists(),
            "another digest's tree was touched"
        );
        let left = temporary_trees(dir.path());
        assert_eq!(left.len(), 1, "{left:?}");
        // The sweep takes the other digest's tree once its lock is free, not while it is held
        // (an unpack of it under way).
        let held = cache.lock_entry(&other).unwrap();
        assert_eq!(cache.remove_killed_unpacks(), 0);
        assert!(theirs.exists());
        drop(held);
        assert_eq!(cache.remove_killed_unpacks(), 1);
        assert!(!theirs.exists());
        assert!(
            root.join("proc").is_dir(),
            "the entry itself is no temporary tree"
        );
    }

    /// Regression: trees of unpacks killed midway under the older naming, `.tmp-<short>-`
    /// (the digest's first 12 hex digits), were never removed. The sweep takes them once the
    /// lock of every digest of that prefix is free at once (any of them may be the unpack's),
    /// or when no digest of that prefix has a lock file (none can be unpacking), never while
    /// one is held.
    #[test]
    fn the_sweep_takes_older_imagos_killed_unpacks_only_when_their_locks_are_free() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RootfsCache::new(dir.path());
        let digest = Digest::of(b"image");
        // Another digest of the same first 12 hex digits: an older tree named by them may be
        // either's.
        let twin: Digest = format!("sha256:{}{}", digest.short(), "0".repeat(52))
            .parse()
            .unwrap();
        let other = Digest::of(b"other image");
        let root = cache.ensure(&Empty, &digest, &empty_image()).unwrap();
        drop(cache.lock_entry(&twin).unwrap());
        drop(cache.lock_entry(&other).unwrap());
        let older = |short: &str, n: u32| {
            let tree = dir.path().join(format!(".tmp-{short}-a{n}Bc9z"));
            fs::create_dir_all(tree.join("usr/lib")).unwrap();
            fs::write(tree.join("usr/lib/partial"), b"half a file").unwrap();
            tree
        };
        let (mine, mine_too) = (older(digest.short(), 1), older(digest.short(), 2));
        let theirs = older(other.short(), 1);
        // No digest of this prefix was ever locked here.
        let lockless = older("0123456789ab", 1);
        let tainted = dir.path().join(format!(".tainted-{}-1", digest.hex()));
        fs::create_dir_all(&tainted).unwrap();

        // An unpack of the twin under way: the trees of that prefix stay, the others go.
        let held = cache.lock_entry(&twin).unwrap();
        assert_eq!(cache.remove_killed_unpacks(), 2);
        assert!(mine.join("usr/lib/partial").exists() && mine_too.exists());
        assert!(!theirs.exists() && !lockless.exists());
        drop(held);
        let held = cache.lock_entry(&digest).unwrap();
        assert_eq!(cache.remove_killed_unpacks(), 0);
        assert!(mine.exists() && mine_too.exists());
        drop(held);
        assert_eq!(cache.remove_killed_unpacks(), 2);
        assert!(!mine.exists() && !mine_too.exists());
        assert!(root.join("proc").is_dir(), "the entry was touched");
        assert!(tainted.exists(), "a set-aside tree is no unpack's");
        let left = temporary_trees(dir.path());
        assert!(left.is_empty(), "{left:?}");
    }
}
