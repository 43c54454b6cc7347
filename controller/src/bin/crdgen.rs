//! Prints the ModelRoute and ModelServer CRDs as multi-document YAML, or writes one file per
//! CRD into a directory (`make crds` writes `crds/`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Generate the CustomResourceDefinitions of Switchyard's API.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Write `<plural>.<group>.yaml` files into this directory instead of printing to stdout.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("crdgen: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let Some(dir) = &args.write else {
        let stream =
            switchyard_crd::crd_yaml_stream().map_err(|err| format!("rendering CRDs: {err}"))?;
        print!("{stream}");
        return Ok(());
    };
    std::fs::create_dir_all(dir).map_err(|err| format!("creating {}: {err}", dir.display()))?;
    for manifest in switchyard_crd::crd_yaml().map_err(|err| format!("rendering CRDs: {err}"))? {
        let path = dir.join(&manifest.file_name);
        std::fs::write(&path, &manifest.yaml)
            .map_err(|err| format!("writing {}: {err}", path.display()))?;
        eprintln!("crdgen: wrote {}", path.display());
    }
    Ok(())
}
