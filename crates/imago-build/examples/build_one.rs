//! Builds one image without the CLI: `build_one HOME IMAGO_TOML NAME`. Used by benches/ to time
//! the library alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let home = Path::new(&args[1]);
    let file = imago_build::DefinitionFile::load(Path::new(&args[2])).unwrap();
    let store = imago_store::Store::open(&home.join("store")).unwrap();
    let options = imago_build::BuildOptions {
        source_date_epoch: 0,
        cache_dir: Some(home.join("build-cache")),
        check: false,
    };
    let start = Instant::now();
    let built = imago_build::build_image(&store, &file, &args[3], &options, &mut |_| {}).unwrap();
    eprintln!("{:.3}s", start.elapsed().as_secs_f64());
    println!("{}", built.digest);
}
