//! `switchyard-fuzz`: runs the harnesses of `switchyard_fuzz::harnesses`
//! (`make fuzz`: a million inputs each) and prints what each found.
#![forbid(unsafe_code)]

use clap::Parser;
use switchyard_fuzz::{generate, harnesses, run};

/// Inputs per harness of `make fuzz`.
const DEFAULT_INPUTS: u64 = 1_000_000;

#[derive(Parser)]
#[command(name = "switchyard-fuzz")]
struct Args {
    /// Generated inputs per harness.
    #[arg(long, default_value_t = DEFAULT_INPUTS)]
    inputs: u64,
    /// Seed of the input generator: the same seed generates the same inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run only this harness.
    #[arg(long)]
    harness: Option<String>,
    /// Print input number N of --harness (hex) and check it alone.
    #[arg(long, requires = "harness")]
    replay: Option<u64>,
}

fn main() {
    let args = Args::parse();
    let selected: Vec<_> = harnesses::all()
        .into_iter()
        .filter(|harness| {
            args.harness
                .as_deref()
                .is_none_or(|name| name == harness.name)
        })
        .collect();
    if selected.is_empty() {
        eprintln!("no harness {:?}", args.harness);
        std::process::exit(64);
    }
    if let Some(iteration) = args.replay {
        let harness = &selected[0];
        let input = generate(harness, args.seed, iteration);
        println!(
            "{}",
            input.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        (harness.check)(&input);
        println!("passes");
        return;
    }
    let mut failed = false;
    for harness in &selected {
        let report = run(harness, args.seed, args.inputs, |done| {
            eprintln!("  {}: {done} inputs", harness.name);
        });
        println!(
            "{:<18} {:>9} inputs  {:>7.1} s  slowest input {:>8.3} ms  failures {}",
            harness.name,
            report.inputs,
            report.elapsed.as_secs_f64(),
            report.slowest.as_secs_f64() * 1000.0,
            report.failures.len()
        );
        for (iteration, message, input) in report.failures.iter().take(5) {
            failed = true;
            let message: String = message.chars().take(300).collect();
            println!(
                "  input {iteration} ({} bytes): {message}\n    replay: --harness {} --seed {} --replay {iteration}",
                input.len(),
                harness.name,
                args.seed
            );
        }
    }
    if failed {
        std::process::exit(1);
    }
}
