//! `gaia-sim`: runs a scenario and writes its report, CSV and plots.

use std::path::PathBuf;

use clap::Parser;

/// Runs a simulated Gaia domain from a scenario file.
#[derive(Parser)]
#[command(name = "gaia-sim", version)]
struct Args {
    /// The scenario (a TOML file, e.g. simulations/scenarios/domain-1k.toml).
    scenario: PathBuf,
    /// Overrides the scenario's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Overrides the scenario's node count.
    #[arg(long)]
    nodes: Option<u32>,
    /// Overrides the scenario's duration, in virtual seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Where to write report.txt, samples.csv and the SVG plots (default:
    /// target/simulations/<scenario name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Threads to run on (default: one per core, at most 2); the outcome is the same on one
    /// thread or two.
    #[arg(long)]
    threads: Option<usize>,
    /// No progress (a bar on a terminal, else a line every ten virtual seconds).
    #[arg(long)]
    quiet: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut scenario = gaia_simulations::Scenario::load(&args.scenario)?;
    if let Some(seed) = args.seed {
        scenario.seed = seed;
    }
    if let Some(nodes) = args.nodes {
        scenario.nodes = nodes;
    }
    if let Some(duration) = args.duration {
        scenario.duration_s = duration;
    }
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from("target/simulations").join(&scenario.name));
    std::fs::create_dir_all(&out)?;
    let threads = args
        .threads
        .unwrap_or_else(gaia_simulations::sim::default_threads);
    let report = gaia_simulations::run(scenario, !args.quiet, threads)?;
    print!("{report}");
    std::fs::write(out.join("report.txt"), report.to_string())?;
    report.write_csv(&out.join("samples.csv"))?;
    gaia_simulations::plot::write(&report, &out)?;
    println!(
        "  wrote {}/report.txt, samples.csv, convergence.svg, members.svg, traffic.svg, requests.svg",
        out.display()
    );
    Ok(())
}
