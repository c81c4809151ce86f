//! Instances through the CLI, as root: run, ps from new processes, logs, stop, rm, both engines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{File, Imago, file, make_image};

fn busybox_image(imago: &Imago) -> String {
    let busybox =
        std::fs::read("/bin/busybox").expect("busybox-static must be installed at /bin/busybox");
    let files = [
        File {
            path: "bin/busybox",
            content: &busybox,
            mode: 0o755,
        },
        file("www/index.html", b"hello from imago\n"),
    ];
    make_image(&imago.store(), "busybox:test", &files);
    "busybox:test".to_owned()
}

fn wait_status(imago: &Imago, id: &str, want: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let json = imago.run(&["inspect-instance", "--json", id]).ok().json();
        if json["status"] == want {
            return json;
        }
        assert!(
            Instant::now() < deadline,
            "instance {id} is {} not {want}",
            json["status"]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lifecycle(runtime: &str) {
    let imago = Imago::new();
    let image = busybox_image(&imago);

    // A short-lived instance: exit status and output are recorded.
    let id = imago
        .run(&[
            "run",
            "--runtime",
            runtime,
            "--env",
            "WHO=cli",
            &image,
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "echo hi $WHO; exit 3",
        ])
        .ok()
        .stdout()
        .trim()
        .to_owned();
    assert_eq!(id.len(), 12, "{id}");
    let done = wait_status(&imago, &id, "exited");
    assert_eq!(done["exit_code"], 3);
    assert_eq!(imago.run(&["logs", &id]).ok().stdout(), "hi cli\n");

    // A long-running one survives the `imago run` process; a new `imago ps` sees it with its address.
    let web = imago
        .run(&[
            "run",
            "--runtime",
            runtime,
            "--name",
            "web",
            "--memory",
            "64M",
            "--cpus",
            "0.5",
            &image,
            "--",
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/www",
        ])
        .ok()
        .stdout()
        .trim()
        .to_owned();
    let ps = imago.run(&["ps", "--json"]).ok().json();
    let list = ps.as_array().expect("array");
    assert_eq!(
        list.len(),
        1,
        "ps shows only running instances by default: {ps}"
    );
    assert_eq!(list[0]["id"], web.as_str());
    assert_eq!(list[0]["status"], "running");
    // The single-threaded `imago run` forked its supervisor (no exec of imago): the supervisor
    // kept the launcher's argv, took its own name, and holds none of the launcher's descriptors
    // (`imago.run` reads stdout to EOF, so a copy of it held here would have hung the test).
    let sup = list[0]["supervisor_pid"].as_i64().expect("supervisor pid");
    let comm = std::fs::read_to_string(format!("/proc/{sup}/comm")).unwrap();
    assert_eq!(comm.trim_end(), "imago-supervise");
    let argv = std::fs::read(format!("/proc/{sup}/cmdline")).unwrap();
    let argv: Vec<&[u8]> = argv.split(|b| *b == 0).collect();
    assert!(
        argv.contains(&&b"run"[..]) && !argv.contains(&&b"__supervise"[..]),
        "{argv:?}"
    );
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{sup}/fd/{fd}")).unwrap();
        assert_eq!(target, std::path::Path::new("/dev/null"), "fd {fd}");
    }
    let addr = list[0]["address"].as_str().expect("address").to_owned();
    let human = imago.run(&["ps"]).ok().stdout();
    assert!(human.contains(&addr) && human.contains("web"), "{human}");
    assert_eq!(
        imago
            .run(&["ps", "--all", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let body = http_get(&format!("{addr}:8080"));
    assert!(body.contains("hello from imago"), "{body}");

    // rm refuses a running instance; stop by name, then rm leaves nothing.
    let err = imago.run(&["rm", &web]).fails();
    assert!(err.contains("running"), "{err}");
    imago.run(&["stop", "--time", "1", "web"]).ok();
    imago.run(&["rm", &web, &id]).ok();
    assert!(
        imago
            .run(&["ps", "--all", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(!std::path::Path::new(&format!("/var/run/netns/imago-{web}")).exists());
}

fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(mut s) => {
                s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                return out;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect to {addr}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn lifecycle_embedded() {
    lifecycle("embedded");
}

#[test]
fn lifecycle_runc() {
    lifecycle("runc");
}

/// `--home` relative to the working directory (as IMAGO_HOME=home would be): launches under
/// both engines work (runc was handed a bundle with a relative rootfs), and so do the commands
/// that find the instance again.
#[test]
fn a_relative_home_works_under_both_engines() {
    let mut imago = Imago::new();
    let image = busybox_image(&imago);
    imago.home = std::path::PathBuf::from("home");
    for runtime in ["runc", "embedded"] {
        let id = imago
            .run(&[
                "run",
                "--runtime",
                runtime,
                &image,
                "--",
                "/bin/busybox",
                "sh",
                "-c",
                "echo hi from $0",
                runtime,
            ])
            .ok()
            .stdout()
            .trim()
            .to_owned();
        let done = wait_status(&imago, &id, "exited");
        assert_eq!(done["exit_code"], 0, "{done}");
        assert_eq!(
            imago.run(&["logs", &id]).ok().stdout(),
            format!("hi from {runtime}\n")
        );
        imago.run(&["rm", &id]).ok();
    }
}

#[test]
fn bad_input_is_refused_with_clear_errors() {
    let imago = Imago::new();
    let image = busybox_image(&imago);
    let err = imago.run(&["run", "missing:latest"]).fails();
    assert!(err.contains("missing"), "{err}");
    let err = imago.run(&["run", "--memory", "lots", &image]).fails();
    assert!(err.contains("lots"), "{err}");
    let err = imago.run(&["run", "--cpus", "0", &image]).fails();
    assert!(err.contains("cpu"), "{err}");
    let err = imago.run(&["run", &image, "--", "/bin/nope"]).fails();
    assert!(err.contains("/bin/nope"), "{err}");
    let all = imago.run(&["ps", "--all", "--json"]).ok().json();
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(all[0]["status"], "failed");
    let err = imago.run(&["stop", "nosuchid"]).fails();
    assert!(err.contains("no such instance nosuchid"), "{err}");
    imago.run(&["rm", all[0]["id"].as_str().unwrap()]).ok();
}

#[test]
fn named_volumes_through_the_cli() {
    let imago = Imago::new();
    let image = busybox_image(&imago);
    let run = |args: &[&str]| {
        let mut all = vec!["run", "-q"];
        all.extend_from_slice(args);
        imago.run(&all).ok().stdout().trim().to_owned()
    };
    let writer = run(&[
        "-v",
        "site:/www",
        &image,
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        "echo changed > /www/extra.html",
    ]);
    assert_eq!(wait_status(&imago, &writer, "exited")["exit_code"], 0);
    let inspected = imago
        .run(&["inspect-instance", "--json", &writer])
        .ok()
        .json();
    assert_eq!(inspected["volumes"][0]["kind"], "named");
    assert_eq!(inspected["volumes"][0]["target"], "/www");
    // The new volume started as a copy of the image's /www, and kept the write.
    let reader = run(&[
        "-v",
        "site:/www:ro",
        &image,
        "--",
        "/bin/busybox",
        "cat",
        "/www/index.html",
        "/www/extra.html",
    ]);
    wait_status(&imago, &reader, "exited");
    assert_eq!(
        imago.run(&["logs", &reader]).ok().stdout(),
        "hello from imago\nchanged\n"
    );
    let ls = imago.run(&["volume", "ls", "--json"]).ok().json();
    assert_eq!(ls[0]["name"], "site");
    assert_eq!(ls[0]["instances"].as_array().unwrap().len(), 2, "{ls}");
    let err = imago.run(&["volume", "rm", "site"]).fails();
    assert!(err.contains("mounted by") && err.contains(&writer), "{err}");
    let err = imago
        .run(&[
            "run",
            "-v",
            "site:/nope",
            &image,
            "--",
            "/bin/busybox",
            "true",
        ])
        .fails();
    assert!(
        err.contains("/nope") && err.contains("does not exist"),
        "{err}"
    );
    let err = imago.run(&["run", "-v", "site", &image]).fails();
    assert!(err.contains("invalid volume"), "{err}");
    imago.run(&["rm", &writer, &reader]).ok();
    imago.run(&["volume", "rm", "site"]).ok();
    assert!(
        imago
            .run(&["volume", "ls", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .is_empty()
    );
    let err = imago.run(&["volume", "rm", "site"]).fails();
    assert!(err.contains("no such volume site"), "{err}");
}

#[test]
fn logs_follow_streams_until_the_instance_ends() {
    use std::io::{BufRead, BufReader};
    let imago = Imago::new();
    let image = busybox_image(&imago);
    // Before the launch: the instance starts after this, so it ends at least 5 s after it.
    // (Taken after `run` returned, the clock missed however long the launch took under load.)
    let before_launch = Instant::now();
    let id = imago
        .run(&[
            "run",
            "-q",
            &image,
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "echo first; sleep 4; echo second; sleep 1; echo third",
        ])
        .ok()
        .stdout()
        .trim()
        .to_owned();
    let mut follow = imago
        .cmd()
        .args(["logs", "-f", &id])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "first");
    // The first line arrives while the instance still runs (4 s before its next line): a
    // stream, not a copy of the log taken when the instance has ended.
    let status = imago.run(&["inspect-instance", "--json", &id]).ok().json();
    assert_eq!(
        status["status"],
        "running",
        "first line only after {:?}",
        before_launch.elapsed()
    );
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert_eq!(rest, ["second", "third"]);
    // And the command ends by itself once the instance has ended, not before.
    assert!(follow.wait().unwrap().success());
    assert!(before_launch.elapsed() >= Duration::from_secs(5));
    assert_eq!(wait_status(&imago, &id, "exited")["exit_code"], 0);
    imago.run(&["rm", &id]).ok();
}

#[test]
fn ps_shows_an_oom_kill_that_the_instance_survived() {
    let imago = Imago::new();
    let image = busybox_image(&imago);
    // The tmpfs pages count against the memory limit and cannot be reclaimed: the kernel kills
    // a process of the instance (dd, usually), and the shell may go on to exit 0.
    let id = imago
        .run(&[
            "run",
            "-q",
            "--memory",
            "16M",
            &image,
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox dd if=/dev/zero of=/dev/shm/fill bs=1M count=60 2>/dev/null; echo after",
        ])
        .ok()
        .stdout()
        .trim()
        .to_owned();
    let inspected = wait_status(&imago, &id, "exited");
    assert_eq!(inspected["oom_killed"], true, "{inspected}");
    let code = inspected["exit_code"].as_i64().unwrap();
    let ps = imago.run(&["ps", "--all"]).ok().stdout();
    let line = ps.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(
        line.contains(&format!("exited({code},oom)")),
        "ps must say what inspect-instance says (oom_killed, exit {code}): {line}"
    );
    imago.run(&["rm", &id]).ok();
}

#[test]
fn logs_follow_loses_nothing_written_while_it_prints_the_log_so_far() {
    use std::io::Read;
    let imago = Imago::new();
    let image = busybox_image(&imago);
    let id = imago
        .run(&[
            "run",
            "-q",
            &image,
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox head -c 200000 /dev/zero | /bin/busybox tr '\\0' x; echo; \
             /bin/busybox sleep 1; echo after",
        ])
        .ok()
        .stdout()
        .trim()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while imago.run(&["logs", &id]).ok().stdout().len() < 200_001 {
        assert!(Instant::now() < deadline, "the instance wrote too little");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut follow = imago
        .cmd()
        .args(["logs", "-f", &id])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Not read yet: printing the log so far fills the pipe and waits while "after" is written.
    std::thread::sleep(Duration::from_millis(1500));
    let mut out = String::new();
    follow
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(follow.wait().unwrap().success());
    assert_eq!(out.len(), 200_001 + "after\n".len());
    assert!(out.ends_with("x\nafter\n"), "{}", &out[out.len() - 20..]);
    imago.run(&["rm", &id]).ok();
}

/// `logs -f --json` follows (it once printed the log so far and returned): one JSON document a
/// line, whose outputs put together are the whole log, including what came after it started.
#[test]
fn logs_follow_with_json_streams_json_lines_until_the_instance_ends() {
    let imago = Imago::new();
    let image = busybox_image(&imago);
    let id = imago
        .run(&[
            "run",
            "-q",
            &image,
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "echo before; /bin/busybox sleep 1; echo 'after é'",
        ])
        .ok()
        .stdout()
        .trim()
        .to_owned();
    let out = imago.run(&["logs", "-f", "--json", &id]).ok().stdout();
    let mut whole = String::new();
    for line in out.lines() {
        let doc: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("not a JSON line ({e}): {line:?} in {out:?}");
        });
        assert_eq!(doc["id"], id.as_str());
        whole.push_str(doc["output"].as_str().unwrap());
    }
    assert_eq!(whole, "before\nafter é\n", "{out}");
    imago.run(&["rm", &id]).ok();
}

#[test]
fn a_bad_seccomp_profile_is_refused_naming_the_file() {
    let imago = Imago::new();
    let image = busybox_image(&imago);
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("docker-style.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction": "SCMP_ACT_ERRNO", "archMap": [], "syscalls": []}"#,
    )
    .unwrap();
    let err = imago
        .run(&["run", "--seccomp", profile.to_str().unwrap(), &image])
        .fails();
    assert!(
        err.contains(&format!("seccomp profile {}", profile.display())) && err.contains("archMap"),
        "{err}"
    );
    let missing = dir.path().join("missing.json");
    let err = imago
        .run(&["run", "--seccomp", missing.to_str().unwrap(), &image])
        .fails();
    assert!(err.contains(&missing.display().to_string()), "{err}");
    let all = imago.run(&["ps", "--all", "--json"]).ok().json();
    assert_eq!(all.as_array().unwrap().len(), 0, "nothing was launched");
}

/// `imago run --init` runs the program under the host's init (PID 1 is tini, the program's
/// status is the instance's); without it the program is PID 1, as in docker; `IMAGO_INIT`
/// naming a missing file fails the launch naming it.
#[test]
fn run_with_init_puts_the_program_under_tini_and_imago_init_names_another() {
    let imago = Imago::new();
    let image = busybox_image(&imago);
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--network", "host"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            &image,
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox cat /proc/1/comm; exit 5",
        ]);
        let id = imago.run(&args).ok().stdout().trim().to_owned();
        let done = wait_status(&imago, &id, "exited");
        assert_eq!(done["exit_code"], 5);
        let logs = imago.run(&["logs", &id]).ok().stdout();
        imago.run(&["rm", &id]).ok();
        logs
    };
    assert_eq!(run(&["--init"]), "init\n");
    assert_eq!(run(&[]), "busybox\n");
    let err = imago
        .cmd()
        .env("IMAGO_INIT", "/nonexistent/tini")
        .args([
            "run",
            "--init",
            "--network",
            "host",
            &image,
            "--",
            "/bin/busybox",
            "true",
        ])
        .output()
        .unwrap();
    assert!(!err.status.success());
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(stderr.contains("/nonexistent/tini"), "{stderr}");
    assert!(
        imago
            .run(&["ps", "-a", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .is_empty()
    );
}
