//! A registry behind htpasswd (bcrypt) and TLS with a test CA: login, a wrong password, the CA
//! in `$IMAGO_HOME/certs.d/HOST:PORT/ca.crt`, credentials from docker's config (auths and a
//! credential helper), and no credential in any output or file in plain text.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use common::Imago;
use common::registry::{self, Proxy, Registry, RegistryOpts, TokenAuth};

const USER: &str = "tester";
const PASSWORD: &str = "Pw-7f3a9c1e-never-shown";

/// Every file below `root` whose bytes contain `needle`.
fn files_containing(root: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for (path, _) in common::snapshot(root) {
        let full = root.join(&path);
        if full.is_file()
            && let Ok(bytes) = std::fs::read(&full)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            hits.push(path.display().to_string());
        }
    }
    hits
}

fn login_stdin(imago: &Imago, host: &str, password: &str) -> common::Run {
    let mut child = registry::cmd(imago)
        .args(["login", host, "-u", USER, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    common::Run {
        output: child.wait_with_output().unwrap(),
    }
}

#[test]
fn login_over_tls_with_the_test_ca_then_push_and_pull_never_showing_the_password() {
    let reg = Registry::start(RegistryOpts::secure(USER, PASSWORD));
    let imago = Imago::new();
    let digest = registry::random_image(&imago, "rand:1", &[200_000], 41);
    reg.install_ca(&imago.home);
    let mut outputs = String::new();

    // Without credentials the registry refuses: a clear error, no password involved.
    let target = format!("{}/secure/rand:1", reg.host());
    let err = registry::run(&imago, &["push", "rand:1", &target]).fails();
    assert!(err.to_lowercase().contains("unauthorized"), "{err}");
    outputs.push_str(&err);

    let login = login_stdin(&imago, &reg.host(), PASSWORD).ok();
    outputs.push_str(&login.stdout());
    outputs.push_str(&login.stderr());
    let auth = imago.home.join("auth.json");
    let mode = std::fs::metadata(&auth).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "auth.json mode {mode:o}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&auth).unwrap()).unwrap();
    assert!(
        doc["auths"][reg.host()].is_object(),
        "auth.json is not in docker config format: {doc}"
    );

    let pushed = registry::run(&imago, &["--json", "push", "rand:1", &target]).ok();
    outputs.push_str(&pushed.stdout());
    outputs.push_str(&pushed.stderr());
    assert_eq!(pushed.json()["digest"], digest.as_str());
    assert_eq!(reg.manifest_digest("secure/rand", "1"), digest);

    // Another home with the CA and a login with -p pulls it.
    let other = Imago::new();
    reg.install_ca(&other.home);
    let login = registry::run(&other, &["login", &reg.host(), "-u", USER, "-p", PASSWORD]).ok();
    outputs.push_str(&login.stdout());
    outputs.push_str(&login.stderr());
    let pulled = registry::run(&other, &["--json", "pull", &target]).ok();
    outputs.push_str(&pulled.stdout());
    outputs.push_str(&pulled.stderr());
    assert_eq!(pulled.json()["digest"], digest.as_str());
    registry::assert_store_valid(&other);

    assert!(
        !outputs.contains(PASSWORD),
        "the password appears in imago's output:\n{outputs}"
    );
    for home in [&imago.home, &other.home] {
        let hits = files_containing(home, PASSWORD.as_bytes());
        assert!(hits.is_empty(), "the password is in plain text in {hits:?}");
    }

    // Logout forgets the registry: the next push is unauthorized again.
    registry::run(&imago, &["logout", &reg.host()]).ok();
    let text = std::fs::read_to_string(&auth).unwrap_or_default();
    assert!(!text.contains(&reg.host()), "logout left {text}");
    let err = registry::run(
        &imago,
        &["push", "rand:1", &format!("{}/secure/again:1", reg.host())],
    )
    .fails();
    assert!(err.to_lowercase().contains("unauthorized"), "{err}");
}

#[test]
fn a_wrong_password_is_a_clear_error_and_nothing_is_saved() {
    let reg = Registry::start(RegistryOpts::secure(USER, PASSWORD));
    let imago = Imago::new();
    reg.install_ca(&imago.home);
    let wrong = "Wrong-5be1d0-password";
    let run = login_stdin(&imago, &reg.host(), wrong);
    let stdout = run.stdout();
    let err = run.fails();
    assert!(err.contains("unauthorized"), "{err}");
    assert!(
        err.contains(&reg.host()),
        "the error does not name the registry: {err}"
    );
    assert!(!err.contains(wrong) && !stdout.contains(wrong), "{err}");
    let saved = std::fs::read_to_string(imago.home.join("auth.json")).unwrap_or_default();
    assert!(
        !saved.contains(&reg.host()),
        "a failed login was saved: {saved}"
    );
    assert!(files_containing(&imago.home, wrong.as_bytes()).is_empty());

    // Without the CA, TLS fails with an error about the certificate, not about the password.
    let no_ca = Imago::new();
    let err = login_stdin(&no_ca, &reg.host(), PASSWORD).fails();
    assert!(!err.contains(PASSWORD), "{err}");
    let lower = err.to_lowercase();
    assert!(
        lower.contains("certificate") || lower.contains("tls") || lower.contains("unknownissuer"),
        "a TLS failure should say so: {err}"
    );
}

#[test]
fn login_asks_for_the_password_on_a_terminal_without_echo_and_refuses_without_one() {
    registry::require_tool("script");
    let reg = Registry::start(RegistryOpts::secure(USER, PASSWORD));
    let imago = Imago::new();
    reg.install_ca(&imago.home);

    // No terminal and no password given: a clear refusal, not a hang or an empty password.
    let run = registry::cmd(&imago)
        .args(["login", &reg.host(), "-u", USER])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = common::Run { output: run }.fails();
    assert!(
        err.contains("no terminal") && err.contains("--password-stdin"),
        "{err}"
    );

    // On a terminal (a pty from util-linux's `script`): the prompt, then the password typed
    // after it, which the terminal must not echo.
    let command = registry::cmd(&imago);
    let mut line = format!("{:?}", command.get_program());
    for arg in command.get_args() {
        line.push_str(&format!(" {arg:?}"));
    }
    line.push_str(&format!(" login {} -u {USER}", reg.host()));
    let mut script = std::process::Command::new("script");
    for (key, value) in command.get_envs() {
        match value {
            Some(v) => script.env(key, v),
            None => script.env_remove(key),
        };
    }
    let mut child = script
        .args(["-qec", &line, "/dev/null"])
        .current_dir(imago.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let started = std::time::Instant::now();
    while !String::from_utf8_lossy(&seen).contains("Password for") {
        let mut buf = [0u8; 256];
        let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
        assert!(
            n > 0 && started.elapsed() < std::time::Duration::from_secs(30),
            "no password prompt: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    // Echo is off before the prompt is printed, so even a password typed the instant the prompt
    // appears is not shown.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{PASSWORD}\n").as_bytes()).unwrap();
    std::io::Read::read_to_end(&mut stdout, &mut seen).unwrap();
    let status = child.wait().unwrap();
    let shown = String::from_utf8_lossy(&seen);
    assert!(status.success(), "login on a terminal failed: {shown}");
    assert!(shown.contains("login succeeded"), "{shown}");
    assert!(
        !shown.contains(PASSWORD),
        "the password was echoed: {shown}"
    );
    let saved = std::fs::read_to_string(imago.home.join("auth.json")).unwrap();
    assert!(saved.contains(&reg.host()), "{saved}");
}

/// A `docker-credential-test` helper that answers `get` with the test's credentials and logs
/// the server it was asked about.
fn credential_helper(dir: &Path) {
    let log = dir.join("helper.log");
    let script = format!(
        "#!/bin/sh\nread server\necho \"$1 $server\" >> {log}\n\
         if [ \"$1\" = get ]; then\n  \
         printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$server\"\n\
         fi\n",
        log = log.display()
    );
    let path = dir.join("docker-credential-test");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn credentials_come_from_docker_config_auths_creds_store_and_cred_helpers() {
    let reg = Registry::start(RegistryOpts::secure(USER, PASSWORD));
    let imago = Imago::new();
    let digest = registry::random_image(&imago, "rand:1", &[100_000], 51);
    reg.install_ca(&imago.home);
    let bin = imago.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    credential_helper(&bin);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let docker_config = imago.dir.path().join("docker");
    std::fs::create_dir_all(&docker_config).unwrap();
    let push = |repo: &str, config: serde_json::Value| {
        std::fs::write(
            docker_config.join("config.json"),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        let out = registry::cmd(&imago)
            .env("DOCKER_CONFIG", &docker_config)
            .env("PATH", &path)
            .args([
                "--json",
                "push",
                "rand:1",
                &format!("{}/{repo}:1", reg.host()),
            ])
            .output()
            .unwrap();
        let run = common::Run { output: out };
        assert!(!run.stdout().contains(PASSWORD) && !run.stderr().contains(PASSWORD));
        run
    };

    // credsStore: the helper is asked about this registry.
    let run = push("store", serde_json::json!({"credsStore": "test"})).ok();
    assert_eq!(run.json()["digest"], digest.as_str());
    let log = std::fs::read_to_string(bin.join("helper.log")).unwrap_or_default();
    assert!(
        log.starts_with("get ") && log.contains(&reg.host()),
        "helper log: {log:?}"
    );

    // credHelpers for this host.
    std::fs::remove_file(bin.join("helper.log")).unwrap();
    push(
        "helpers",
        serde_json::json!({"credHelpers": {reg.host(): "test"}}),
    )
    .ok();
    assert!(bin.join("helper.log").exists(), "credHelpers not used");

    // auths with base64(user:password).
    let b64 = registry::tool(
        "sh",
        &[
            "-c",
            &format!("printf '%s' '{USER}:{PASSWORD}' | base64 -w0"),
        ],
    );
    push(
        "auths",
        serde_json::json!({"auths": {reg.host(): {"auth": b64.trim()}}}),
    )
    .ok();
    for repo in ["store", "helpers", "auths"] {
        assert_eq!(reg.manifest_digest(repo, "1"), digest);
    }

    // A helper that knows nothing: unauthorized, clearly.
    std::fs::write(
        bin.join("docker-credential-test"),
        "#!/bin/sh\necho 'credentials not found in native keychain'\nexit 1\n",
    )
    .unwrap();
    let err = push("none", serde_json::json!({"credsStore": "test"})).fails();
    assert!(
        err.to_lowercase().contains("unauthorized") || err.contains("credential"),
        "{err}"
    );
}

#[test]
fn the_bearer_token_flow_works_anonymously_and_with_a_login() {
    let reg = Registry::start(RegistryOpts::plain());
    let imago = Imago::new();
    let digest = registry::random_image(&imago, "rand:1", &[100_000], 61);

    // Anonymous tokens: no login, the client fetches a token for the scope and retries.
    let anonymous = Proxy::with_token_auth(&reg.host(), TokenAuth { credentials: None });
    let pushed = registry::run_json(
        &imago,
        &[
            "push",
            "rand:1",
            &format!("{}/tok/anon:1", anonymous.host()),
        ],
    );
    assert_eq!(pushed["digest"], digest.as_str());
    let summary = anonymous.summary();
    assert!(
        summary.contains("GET /token"),
        "no token was fetched:\n{summary}"
    );
    assert!(
        summary.contains("repository:tok/anon:pull,push")
            || summary.contains("repository%3Atok%2Fanon%3Apull%2Cpush"),
        "the token request does not carry the challenge's scope:\n{summary}"
    );
    let host = Imago::new();
    let pulled = registry::run_json(
        &host,
        &["pull", &format!("{}/tok/anon:1", anonymous.host())],
    );
    assert_eq!(pulled["digest"], digest.as_str());

    // A token server that wants Basic credentials: unauthorized without, fine after login.
    let locked = Proxy::with_token_auth(
        &reg.host(),
        TokenAuth {
            credentials: Some((USER.into(), PASSWORD.into())),
        },
    );
    let target = format!("{}/tok/locked:1", locked.host());
    let err = registry::run(&imago, &["push", "rand:1", &target]).fails();
    assert!(err.to_lowercase().contains("unauthorized"), "{err}");
    let err = login_stdin(&imago, &locked.host(), "not-the-password").fails();
    assert!(err.contains("unauthorized"), "{err}");
    login_stdin(&imago, &locked.host(), PASSWORD).ok();
    let pushed = registry::run_json(&imago, &["push", "rand:1", &target]);
    assert_eq!(pushed["digest"], digest.as_str());
    assert_eq!(reg.manifest_digest("tok/locked", "1"), digest);
    assert!(files_containing(&imago.home, PASSWORD.as_bytes()).is_empty());
}
