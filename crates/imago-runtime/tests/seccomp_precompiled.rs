//! The embedded engine's precompiled seccomp filter (issue 15), checked from inside real
//! instances, as root: the filter holds whatever state its cache is in.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use common::Harness;
use imago_runtime::seccomp_cache::{ANNOTATION, BUNDLE_FILE, PRECOMPILED};
use imago_runtime::{Engine, Provider, Seccomp, Status};

/// Prints the filter mode of the shell and whether it may make a user namespace and a
/// directory (`unshare=0` and `mkdir=0` mean allowed).
const CHECK: &str = "cat /proc/self/status | tr '\\t' ' ' | while read k v; do \
     [ \"$k\" = Seccomp: ] && echo seccomp=$v; done; \
     unshare -U true; echo unshare=$?; mkdir /tmp/d; echo mkdir=$?";

fn cache_files(h: &Harness) -> Vec<PathBuf> {
    let dir = h.home().join("runtime").join("seccomp");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .map(|entries| entries.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// Runs one instance under the default filter and returns the cache file it left.
fn program_of_a_filtered_launch(h: &Harness) -> PathBuf {
    let (_, logs) = check(h, Seccomp::Default);
    assert_default_filter(&logs);
    cache_files(h).pop().unwrap()
}

/// Runs `CHECK` under `seccomp` and returns its output.
fn check(h: &Harness, seccomp: Seccomp) -> (String, String) {
    let mut spec = h.spec(&["sh", "-c", CHECK]);
    spec.seccomp = seccomp;
    let inst = h.run_to_exit(&spec);
    let logs = h.logs(&inst.id);
    assert_eq!(inst.status, Status::Exited, "{logs}");
    h.provider.remove(&inst.id).unwrap();
    (inst.id, logs)
}

fn assert_default_filter(logs: &str) {
    assert!(logs.contains("seccomp=2\n"), "no filter: {logs}");
    assert!(logs.contains("unshare=1\n"), "unshare was allowed: {logs}");
    assert!(logs.contains("mkdir=0\n"), "{logs}");
}

#[test]
fn the_default_filter_is_loaded_from_one_cached_program_for_every_launch() {
    let h = Harness::new(Engine::Embedded);
    let mut spec = h.spec(&["sleep", "1000"]);
    spec.network = imago_runtime::NetworkMode::Host;
    let inst = h.provider.launch(&spec).unwrap();
    let bundle = h.home().join("instances").join(&inst.id).join("bundle");
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config.pointer("/linux/seccomp"),
        None,
        "libcontainer would compile it"
    );
    assert_eq!(
        config.pointer(&format!("/annotations/{ANNOTATION}")),
        Some(&serde_json::Value::from(PRECOMPILED))
    );
    let rules: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join(BUNDLE_FILE)).unwrap()).unwrap();
    assert_eq!(
        Some(rules),
        Seccomp::Default.oci_section(Engine::Runc).unwrap(),
        "the bundle's rules are the profile's, in the OCI operand order"
    );
    h.provider
        .stop(&inst.id, std::time::Duration::from_millis(100))
        .unwrap();
    h.provider.remove(&inst.id).unwrap();

    let files = cache_files(&h);
    assert_eq!(files.len(), 1, "{files:?}");
    let written = fs::metadata(&files[0]).unwrap();
    let (_, logs) = check(&h, Seccomp::Default);
    assert_default_filter(&logs);
    let reused = fs::metadata(&files[0]).unwrap();
    assert_eq!(
        (written.ino(), written.mtime_nsec()),
        (reused.ino(), reused.mtime_nsec()),
        "the second launch rewrote the cache instead of reading it"
    );
    assert_eq!(cache_files(&h), files);
}

#[test]
fn a_profile_file_gets_its_own_program_and_its_errno() {
    let h = Harness::new(Engine::Embedded);
    let profile = h.tmp.path().join("no-mkdir.json");
    // EDQUOT: an errno no other layer would answer mkdir in /tmp with.
    fs::write(
        &profile,
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 122}]}"#,
    )
    .unwrap();
    let (_, logs) = check(&h, Seccomp::load(&profile).unwrap());
    assert!(logs.contains("seccomp=2\n"), "{logs}");
    assert!(logs.contains("Disk quota exceeded"), "{logs}");
    assert!(logs.contains("mkdir=1\n"), "{logs}");
    assert!(logs.contains("unshare=0\n"), "{logs}");
    let (_, logs) = check(&h, Seccomp::Default);
    assert_default_filter(&logs);
    assert_eq!(cache_files(&h).len(), 2, "one program per profile");
}

#[test]
fn unconfined_instances_get_no_filter_and_no_program() {
    let h = Harness::new(Engine::Embedded);
    let (id, logs) = check(&h, Seccomp::Unconfined);
    assert!(logs.contains("seccomp=0\n"), "{logs}");
    assert!(logs.contains("unshare=0\n"), "{logs}");
    assert!(cache_files(&h).is_empty(), "{id}: {:?}", cache_files(&h));
}

/// The file a launch finds may be anything: a program that allows every syscall under a valid
/// header of the right program (the dangerous case), cut short, or empty. None is ever loaded.
#[test]
fn a_damaged_cache_file_is_compiled_again_never_loaded() {
    let h = Harness::new(Engine::Embedded);
    let file = program_of_a_filtered_launch(&h);
    let good = fs::read(&file).unwrap();
    let header = 8 + 64; // magic, then the hex digest
    let mut allow_all = good[..header].to_vec();
    allow_all.extend_from_slice(&0x06u16.to_ne_bytes()); // BPF_RET | BPF_K
    allow_all.extend_from_slice(&[0, 0]);
    allow_all.extend_from_slice(&0x7fff_0000u32.to_ne_bytes()); // SECCOMP_RET_ALLOW
    for damaged in [allow_all, good[..good.len() - 3].to_vec(), Vec::new()] {
        fs::write(&file, &damaged).unwrap();
        let (_, logs) = check(&h, Seccomp::Default);
        assert_default_filter(&logs);
        assert_eq!(fs::read(&file).unwrap(), good, "the cache was not repaired");
    }
}

/// Launches that all find the cache empty compile at the same time; each renames a whole file
/// into place and every instance runs under the filter.
#[test]
fn launches_racing_to_fill_the_cache_all_run_filtered() {
    let h = Harness::new(Engine::Embedded);
    let outputs: Vec<String> = std::thread::scope(|scope| {
        let launches: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| check(&h, Seccomp::Default).1))
            .collect();
        launches.into_iter().map(|l| l.join().unwrap()).collect()
    });
    for logs in &outputs {
        assert_default_filter(logs);
    }
    let files = cache_files(&h);
    assert_eq!(files.len(), 1, "{files:?}");
    let racing = fs::read(&files[0]).unwrap();
    fs::remove_file(&files[0]).unwrap();
    let (_, logs) = check(&h, Seccomp::Default);
    assert_default_filter(&logs);
    assert_eq!(
        fs::read(&files[0]).unwrap(),
        racing,
        "the race left a different file"
    );
}

/// A program the kernel refuses fails the launch at create, with an error that names the
/// profile and its files, and leaves nothing running: the filter is loaded only right before
/// the exec, after the instance was reported started, so without the check at create the
/// launch "succeeded" and the instance died at once. The program here loads a misaligned
/// offset of `struct seccomp_data` (EINVAL), under a header written as this user would: the
/// cache believes it, the kernel does not.
#[test]
fn a_filter_the_kernel_refuses_fails_the_launch_at_create_naming_the_profile() {
    let h = Harness::new(Engine::Embedded);
    let file = program_of_a_filtered_launch(&h);
    let key_hex = file.file_stem().unwrap().to_str().unwrap().to_owned();
    // The first launch's check passed and was recorded; the record names the program it was
    // made with, so the forged program below is checked all the same.
    let record = h.home().join("runtime/seccomp.loads").join(&key_hex);
    assert!(record.is_file(), "no record of the first launch's check");
    let refused: Vec<u8> = [
        0x20u16.to_ne_bytes().as_slice(), // BPF_LD | BPF_W | BPF_ABS
        &[0, 0],
        &1u32.to_ne_bytes(),    // not a multiple of 4
        &0x06u16.to_ne_bytes(), // BPF_RET | BPF_K
        &[0, 0],
        &0x7fff_0000u32.to_ne_bytes(), // SECCOMP_RET_ALLOW
    ]
    .concat();
    let integrity = imago_oci::Digest::of(&[key_hex.as_bytes(), &refused].concat());
    let forged = [
        b"IMGBPF1\n".as_slice(),
        integrity.hex().as_bytes(),
        &refused,
    ]
    .concat();
    fs::write(&file, &forged).unwrap();

    let mut spec = h.spec(&["sleep", "1000"]);
    spec.network = imago_runtime::NetworkMode::Host;
    let err = match h.provider.launch(&spec) {
        Ok(inst) => panic!("{} was reported started under a refused filter", inst.id),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("imago's default seccomp profile"), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains(BUNDLE_FILE), "{err}");
    assert!(err.contains("EINVAL"), "{err}");
    for inst in h.provider.list().unwrap() {
        assert_ne!(inst.status, Status::Running, "{inst:?}");
    }
    assert_eq!(
        fs::read(&file).unwrap(),
        forged,
        "the check wrote the cache"
    );
}
