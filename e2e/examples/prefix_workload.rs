//! Runs the cache-bound shared-prefix workload
//! ([`PrefixWorkload::two_engines`]) through running dataplanes and prints one
//! Markdown row of the scheduling-quality table: prefix-cache hit rate and
//! requests per engine from the engines' own `/metrics`, client latency p50 /
//! p90, errors. `e2e/vllm.sh quality` (`make e2e-vllm-quality`) runs it
//! against real vLLM engines.
//!
//! With `--check-targets` it also prints, on stderr, whether the row meets
//! the scheduling-quality targets (`prefix_workload::TARGET_HIT_RATE`,
//! `TARGET_BUSIEST_SHARE`) and exits with status 3 if it misses one.
//!
//! ```text
//! prefix_workload --strategy NAME --model MODEL [--seed N] [--check-targets]
//!     --dataplane http://HOST:PORT [--dataplane ...]
//!     --engine http://HOST:PORT [--engine ...]
//! ```

use std::process::ExitCode;

use switchyard_e2e::harness::HttpClient;
use switchyard_e2e::prefix_workload::{EngineCounters, PrefixWorkload, QualityRow};

struct Args {
    strategy: String,
    model: String,
    seed: u64,
    dataplanes: Vec<String>,
    engines: Vec<String>,
    check_targets: bool,
}

/// Exit status of a run that missed a target (1 is a failed run, 2 bad flags).
const TARGET_MISSED: u8 = 3;

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        strategy: String::new(),
        model: String::new(),
        seed: 1,
        dataplanes: Vec::new(),
        engines: Vec::new(),
        check_targets: false,
    };
    while let Some(flag) = args.next() {
        if flag == "--check-targets" {
            parsed.check_targets = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--strategy" => parsed.strategy = value,
            "--model" => parsed.model = value,
            "--seed" => parsed.seed = value.parse().map_err(|e| format!("--seed: {e}"))?,
            "--dataplane" => parsed.dataplanes.push(value),
            "--engine" => parsed.engines.push(value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if parsed.model.is_empty() || parsed.dataplanes.is_empty() || parsed.engines.is_empty() {
        return Err("--model, --dataplane and --engine are required".to_owned());
    }
    Ok(parsed)
}

async fn counters(http: &HttpClient, engines: &[String]) -> Result<Vec<EngineCounters>, String> {
    let mut all = Vec::with_capacity(engines.len());
    for engine in engines {
        all.push(EngineCounters::read(http, &format!("{engine}/metrics")).await?);
    }
    Ok(all)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("prefix_workload: {message}");
            return ExitCode::from(2);
        }
    };
    let http = HttpClient::default();
    let workload = PrefixWorkload {
        seed: args.seed,
        ..PrefixWorkload::two_engines(&args.model)
    };
    let result = async {
        let before = counters(&http, &args.engines).await?;
        let run = workload.run(&http, &args.dataplanes).await;
        let after = counters(&http, &args.engines).await?;
        Ok::<_, String>(QualityRow {
            strategy: args.strategy.clone(),
            dataplanes: args.dataplanes.len(),
            engines: after.iter().zip(&before).map(|(a, b)| a.since(b)).collect(),
            run,
        })
    }
    .await;
    match result {
        Ok(row) => {
            print!("{}", row.markdown());
            if !args.check_targets {
                return ExitCode::SUCCESS;
            }
            let (met, verdicts) = row.target_verdicts();
            for line in verdicts {
                eprintln!("{line}");
            }
            if met {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(TARGET_MISSED)
            }
        }
        Err(message) => {
            eprintln!("prefix_workload: {message}");
            ExitCode::FAILURE
        }
    }
}
