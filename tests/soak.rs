//! Long runs and threads, at small sizes so CI stays fast: a few hundred training steps must not
//! grow the process's resident memory after warm-up, and several threads sharing one `Context`,
//! each with its own modules, must compute bit for bit what one thread computes.

mod common;

use normdrop::{sgd_step, BatchNorm, Context, Dropout, LayerNorm, Tensor};

/// One training step of a small BatchNorm → Dropout → LayerNorm stack with SGD on the
/// parameters; returns the loss gradient's downstream `dx` of the BatchNorm as bits.
struct Stack {
    bn: BatchNorm,
    drop: Dropout,
    ln: LayerNorm,
}

impl Stack {
    /// Inputs of shape `(8, 4, width)`.
    fn new(ctx: &Context, seed: u64, width: usize) -> Self {
        Self {
            bn: BatchNorm::new(ctx, 4).unwrap(),
            drop: normdrop::Dropout::with_config(ctx, normdrop::DropoutConfig::new(0.25), seed).unwrap(),
            ln: LayerNorm::new(ctx, &[width]).unwrap(),
        }
    }

    fn step(&mut self, ctx: &Context, x: &Tensor, dy: &Tensor) -> Tensor {
        let h = self.bn.forward(x).unwrap();
        let d = self.drop.forward(&h).unwrap();
        let y = self.ln.forward(&d).unwrap();
        let _ = y;
        let g = self.ln.backward(dy).unwrap();
        let dd = self.drop.backward(&g.dx).unwrap();
        let gb = self.bn.backward(&dd).unwrap();
        for (p, grad) in [
            (self.ln.weight(), g.dweight.as_ref()),
            (self.ln.bias(), g.dbias.as_ref()),
            (self.bn.weight(), gb.dweight.as_ref()),
            (self.bn.bias(), gb.dbias.as_ref()),
        ] {
            sgd_step(ctx, p.unwrap(), grad.unwrap(), 0.01).unwrap();
        }
        gb.dx
    }
}

fn inputs(ctx: &Context, seed: u64, width: usize) -> (Tensor, Tensor) {
    let mut rng = common::Rng::new(seed);
    let shape = [8, 4, width];
    let n = 32 * width;
    (
        Tensor::from_slice(ctx, &rng.normal_vec(n, 0.5, 2.0), &shape).unwrap(),
        Tensor::from_slice(ctx, &rng.normal_vec(n, 0.0, 1.0), &shape).unwrap(),
    )
}

/// Resident memory of this process in KiB (Linux).
#[cfg(target_os = "linux")]
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[cfg(target_os = "linux")]
#[test]
fn training_steps_do_not_grow_memory() {
    let Some(ctx) = common::own_ctx() else { return };
    // 128 KiB activations: one buffer leaked per step would add about 38 MiB.
    let (x, dy) = inputs(&ctx, 1, 1024);
    let mut stack = Stack::new(&ctx, 9, 1024);
    let mut rss = Vec::new();
    for step in 0..400 {
        stack.step(&ctx, &x, &dy);
        if step % 50 == 49 {
            // wgpu frees dropped resources once the GPU is done with them.
            ctx.synchronize().unwrap();
            rss.push(rss_kib());
        }
    }
    // Warm-up: the first 100 steps compile pipelines and fill caches. After it, resident
    // memory may wobble but not climb: each module call allocates its outputs, and leaking even
    // one of them per step would add tens of megabytes over 300 steps.
    eprintln!("resident memory every 50 steps (KiB): {rss:?}");
    let after_warm_up = rss[1];
    let last = *rss.last().unwrap();
    assert!(
        last <= after_warm_up + 4096,
        "resident memory grew from {after_warm_up} KiB after warm-up to {last} KiB: {rss:?}"
    );
}

#[test]
fn threads_sharing_a_context_match_one_thread() {
    let Some(ctx) = common::own_ctx() else { return };
    const THREADS: u64 = 4;
    const STEPS: usize = 12;
    let run = |ctx: &Context, t: u64| -> Vec<Vec<u32>> {
        let (x, dy) = inputs(ctx, 100 + t, 16);
        let mut stack = Stack::new(ctx, t, 16);
        (0..STEPS)
            .map(|_| {
                let dx = stack.step(ctx, &x, &dy);
                dx.to_vec_blocking::<f32>(ctx)
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            })
            .collect()
    };
    let alone: Vec<_> = (0..THREADS).map(|t| run(&ctx, t)).collect();
    let together: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let ctx = ctx.clone();
                s.spawn(move || run(&ctx, t))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for t in 0..THREADS as usize {
        assert_eq!(
            alone[t], together[t],
            "thread {t} computed something else beside the others"
        );
    }
}
