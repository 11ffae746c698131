//! The `normdrop` command: adapter information, PyTorch fixture checks and kernel benchmarks.

mod bench;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use normdrop::wgpu;
use normdrop::{Context, ContextOptions};
use normdrop_cli::fixture::{self, Verdict};

#[derive(Parser)]
#[command(
    name = "normdrop",
    version,
    about = "GPU normalization and dropout kernels: info and PyTorch parity checks"
)]
struct Cli {
    /// Store f16 activations packed in u32 words even where the adapter has SHADER_F16 (the
    /// fallback path every device can run).
    #[arg(long, global = true)]
    packed_f16: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the adapter, backend, features and limits normdrop would use.
    Info,
    /// Validate every op against the CPU reference, then time it: median/p20/p80, GB/s by the
    /// minimal-bytes formula, percentage of this adapter's copy bandwidth, fused speedups.
    Bench(bench::BenchArgs),
    /// Prove every op and every path this device can take against the f64 CPU reference, on
    /// awkward shapes, with dropout masks bit for bit and the PyTorch fixtures. One line per
    /// check, then `N passed, M failed, K skipped`; exits 1 on any failure.
    Selftest {
        /// More shapes, larger masks (a few minutes on a CPU driver).
        #[arg(long, conflicts_with = "quick")]
        thorough: bool,
        /// The default: the shapes that cover every path, in under a minute on lavapipe.
        #[arg(long)]
        quick: bool,
        /// Read the fixtures from this folder instead of the copies built into the binary.
        #[arg(long)]
        fixtures: Option<PathBuf>,
        /// Run only the checks whose line contains this text (e.g. `layer_norm_backward`,
        /// `packed-f16`, `fixture`), to repeat a failure quickly.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Run PyTorch fixture files through the kernels: one line per compared tensor, then
    /// `N passed, M failed`. Exits nonzero on any failure.
    Check {
        /// Fixture files (`normdrop-fixture/1` safetensors).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command, cli.packed_f16) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("normdrop: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command, packed_f16: bool) -> normdrop::Result<ExitCode> {
    let ctx = Context::with_options_blocking(ContextOptions {
        force_packed_f16: packed_f16,
        ..Default::default()
    })?;
    match command {
        Command::Info => {
            info(&ctx);
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { files } => check(&ctx, &files),
        Command::Selftest {
            thorough,
            quick: _,
            fixtures,
            filter,
        } => selftest(
            &ctx,
            normdrop_cli::selftest::Options {
                thorough,
                fixtures,
                filter,
            },
        ),
        Command::Bench(args) => Ok(if bench::run(&ctx, args)? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
    }
}

fn info(ctx: &Context) {
    let a = ctx.adapter_info();
    println!("adapter      {}", a.name);
    println!("backend      {:?}", a.backend);
    println!("device type  {:?}", a.device_type);
    println!("driver       {} {}", a.driver, a.driver_info);
    println!("vendor/id    {:#06x}/{:#06x}", a.vendor, a.device);
    let f = ctx.features();
    println!("features used when present:");
    for (name, flag, buys) in [
        (
            "SHADER_F16",
            wgpu::Features::SHADER_F16,
            "native f16 storage (else packed u32)",
        ),
        (
            "TIMESTAMP_QUERY",
            wgpu::Features::TIMESTAMP_QUERY,
            "GPU timestamps in bench (else wall time)",
        ),
        (
            "SUBGROUP",
            wgpu::Features::SUBGROUP,
            "subgroup operations in BatchNorm's workgroup reductions (else workgroup memory); on CPU adapters LayerNorm's row-per-subgroup passes (else the row-block path)",
        ),
        (
            "SHADER_INT64",
            wgpu::Features::SHADER_INT64,
            "Philox products as 64-bit multiplies (else from 16-bit halves)",
        ),
    ] {
        println!(
            "  {:<16} {:<4} {buys}",
            name,
            if f.contains(flag) { "yes" } else { "no" }
        );
    }
    let l = ctx.limits();
    println!("limits:");
    println!(
        "  max_storage_buffer_binding_size      {}",
        l.max_storage_buffer_binding_size
    );
    println!("  max_buffer_size                      {}", l.max_buffer_size);
    println!(
        "  max_storage_buffers_per_shader_stage {}",
        l.max_storage_buffers_per_shader_stage
    );
    println!(
        "  max_compute_workgroups_per_dimension {}",
        l.max_compute_workgroups_per_dimension
    );
    println!(
        "  max_compute_invocations_per_workgroup {}",
        l.max_compute_invocations_per_workgroup
    );
    println!(
        "  max_compute_workgroup_storage_size   {}",
        l.max_compute_workgroup_storage_size
    );
    println!(
        "  min_storage_buffer_offset_alignment  {}",
        l.min_storage_buffer_offset_alignment
    );
    println!(
        "  min/max subgroup size                {}/{}",
        a.subgroup_min_size, a.subgroup_max_size
    );
}

fn selftest(ctx: &Context, options: normdrop_cli::selftest::Options) -> normdrop::Result<ExitCode> {
    let a = ctx.adapter_info();
    println!("adapter: {} ({:?}, {:?})", a.name, a.backend, a.device_type);
    println!(
        "subgroup sizes: {}..{} (SUBGROUP {}); every subgroup path below ran at the size the driver chose",
        a.subgroup_min_size,
        a.subgroup_max_size,
        if ctx.features().contains(wgpu::Features::SUBGROUP) {
            "on"
        } else {
            "off"
        }
    );
    let start = std::time::Instant::now();
    let summary = normdrop_cli::selftest::run(ctx, &options, &mut |c| println!("{c}"));
    println!(
        "{} passed, {} failed, {} skipped ({:.0} s)",
        summary.passed,
        summary.failed,
        summary.skipped,
        start.elapsed().as_secs_f64()
    );
    Ok(if summary.failed == 0 && summary.passed > 0 {
        ExitCode::SUCCESS
    } else {
        // A run that checked nothing (a filter that matched no check) proves nothing.
        ExitCode::FAILURE
    })
}

fn check(ctx: &Context, files: &[PathBuf]) -> normdrop::Result<ExitCode> {
    println!(
        "adapter: {} ({:?})",
        ctx.adapter_info().name,
        ctx.adapter_info().backend
    );
    let (mut passed, mut failed, mut skipped) = (0usize, 0usize, 0usize);
    for path in files {
        let lines = match fixture::Fixture::load(path).and_then(|fx| fixture::check(ctx, &fx)) {
            Ok(lines) => lines,
            Err(e) => {
                // A file that cannot be read or run counts as a failure, never as nothing.
                println!("{:<34} {:<26} FAILED   {e}", path.display(), "(file)");
                failed += 1;
                continue;
            }
        };
        for line in lines {
            println!("{line}");
            match line.verdict {
                Verdict::Pass(_) => passed += 1,
                Verdict::Fail(_) => failed += 1,
                Verdict::Skip(_) => skipped += 1,
            }
        }
    }
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
