//! `oqt`: the command line. Parses arguments, sets up logging, progress and
//! threads, and hands work to the library crates; it does no numerics itself.

mod cmd;
mod output;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "oqt",
    version,
    about = "Make language models small and fast enough for phones — and prove they still work",
    long_about = None,
    after_help = "Models: an alias (smollm2-135m, llama-3.2-1b, …; see `oqt fetch --list`), a GGUF file, \
                  a Hugging Face directory, or a hub id (org/name).\n\
                  Logs: -v / -vv, or OQT_LOG=debug."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    /// More log output (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Worker threads for tensor math (default: all cores).
    #[arg(long, global = true, env = "OQT_THREADS")]
    threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Download a model (or find it in the cache) and print where it is.
    Fetch(cmd::fetch::FetchArgs),
    /// Show a model's architecture, tensor types, sizes and tokenizer.
    Inspect(cmd::inspect::InspectArgs),
    /// Measure perplexity on a dataset (llama.cpp's llama-perplexity protocol).
    Eval(cmd::eval::EvalArgs),
    /// Generate text from a prompt (chat template applied unless --raw).
    Generate(cmd::generate::GenerateArgs),
    /// Quantize a model with a recipe into a bundle the runtime runs.
    Quantize(cmd::quantize::QuantizeArgs),
    /// Prune every decoder linear (magnitude, Wanda, SparseGPT; DSnoT on top) into a sparse float bundle.
    Prune(cmd::prune::PruneArgs),
    /// Palettize every decoder linear (k-means LUT, tables per group of channels) into a `lut` bundle.
    Cluster(cmd::cluster::ClusterArgs),
    /// Remove decoder blocks under a budget (FoldGPT gates, ShortGPT, last-N) into a float bundle.
    Fold(cmd::fold::FoldArgs),
    /// Teach a student (float, folded or quantized) a teacher's distribution; first- or zeroth-order.
    Distill(cmd::distill::DistillArgs),
    /// Measure prefill/decode speed, time to first token and memory of a bundle or model.
    Bench(cmd::bench::BenchArgs),
    /// Per-layer quantization sensitivity: the output error when only one layer is quantized.
    Sensitivity(cmd::sensitivity::SensitivityArgs),
    /// Write a bundle or model as GGUF (llama.cpp) or a Hugging Face directory.
    Export(cmd::export::ExportArgs),
    /// Quantization-aware training; `--zeroth-order`: forward passes only (SPSA), at inference memory.
    Qat(cmd::qat::QatArgs),
    /// Train a LoRA adapter on a frozen quantized base (first- or zeroth-order); PEFT and GGUF adapter files.
    Finetune(cmd::finetune::FinetuneArgs),
    /// Merge a LoRA adapter into its quantized base as a new bundle (re-quantized with the base's recipe).
    Merge(cmd::merge::MergeArgs),
    /// Run a recipe's pipeline (`[[steps]]`: quantize, then qat, …) from one command, resumable between steps.
    Run(cmd::run::RunArgs),
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("OQT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    // The command itself runs on a pool thread: a parallel loop started there
    // splits work with the pool's other threads directly, where one started on
    // the main thread would hand the loop over and sleep until it is done — two
    // cross-thread wake-ups per matmul, most of a decode step's time on 2 cores.
    // Pool threads get a main thread's stack (deep Burn graphs recurse).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cli.threads.unwrap_or(0))
        .stack_size(64 << 20)
        .build_global();
    if let Err(e) = pool {
        eprintln!("error: --threads {:?}: {e}", cli.threads);
        return std::process::ExitCode::from(2);
    }
    let result = rayon::scope(|_| run_command(cli.command));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_message(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Fetch(a) => cmd::fetch::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Prune(a) => cmd::prune::run(a),
        Command::Cluster(a) => cmd::cluster::run(a),
        Command::Fold(a) => cmd::fold::run(a),
        Command::Distill(a) => cmd::distill::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Sensitivity(a) => cmd::sensitivity::run(a),
        Command::Export(a) => cmd::export::run(a),
        Command::Qat(a) => cmd::qat::run(a),
        Command::Finetune(a) => cmd::finetune::run(a),
        Command::Merge(a) => cmd::merge::run(a),
        Command::Run(a) => cmd::run::run(a),
    }
}

/// The error and its causes on one line, `outer: inner: …`. Several of the
/// library errors already print their source (`{path}: {source}`), so a cause
/// whose text ends the line so far is not repeated.
fn error_message(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.is_empty() {
            message = text;
        } else if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::error_message;
    use anyhow::Context;

    #[test]
    fn a_source_the_message_already_prints_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let error = anyhow::Error::new(oqt_core::CoreError::io("missing.oqt", io));
        assert_eq!(error_message(&error), "missing.oqt: No such file or directory");
    }

    #[test]
    fn context_and_causes_are_joined_in_order() {
        let result: anyhow::Result<()> = Err(anyhow::anyhow!("header too small"));
        let error = result
            .context("reading b.oqt")
            .context("loading the bundle")
            .unwrap_err();
        assert_eq!(
            error_message(&error),
            "loading the bundle: reading b.oqt: header too small"
        );
    }
}
