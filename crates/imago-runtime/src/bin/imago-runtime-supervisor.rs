//! A standalone supervisor (`imago-runtime-supervisor HOME ID`) for this crate's tests and
//! benchmarks; the imago CLI runs the same code as its hidden `__supervise` subcommand.
#![forbid(unsafe_code)]

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let [home, id] = args.as_slice() else {
        std::process::exit(2);
    };
    let id = id.to_string_lossy();
    let code = imago_runtime::supervisor::supervise(
        std::path::Path::new(home),
        &id,
        &mut std::io::stdin(),
        &mut std::io::stdout(),
    );
    std::process::exit(code);
}
