//! The training loop: micro-batches → masked loss → backward → accumulate → clip → AdamW →
//! schedule, with validation, checkpoints, exact resume, metrics and a progress bar.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;

use super::checkpoint::{self, TrainerState, OPTIMIZER_FILE};
use super::data::{Batch, DataLoader};
use super::loss::masked_cross_entropy_sum;
use super::metrics::{MetricRecord, MetricsLog};
use super::optimizer::{clip_factor, global_grad_norm, AdamW, AdamWConfig};
use super::rng::TrainRng;
use super::schedule::LrSchedule;
use super::CausalLm;
use crate::lora::{self, AdapterSpec, PeftAdapter};
use crate::{Error, Result};

/// Settings of a training run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Learning-rate schedule; its `total_steps` is the number of optimiser steps.
    pub schedule: LrSchedule,
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this value (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Measure validation loss every this many steps (0: only at the end, if there is data).
    pub eval_every: usize,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Seed for data order and dropout.
    pub seed: u64,
    /// Output folder: adapter, checkpoints/, metrics.jsonl, loss.png.
    pub out_dir: PathBuf,
    /// Draw a progress bar on the terminal.
    pub progress: bool,
    /// Print a line with the metrics every this many steps (0: never).
    pub log_every: usize,
    /// Base model name recorded in `adapter_config.json`.
    pub base_model: Option<String>,
    /// Stop after this optimiser step even though the schedule runs longer (to interrupt a run
    /// deliberately, as a test of resuming does).
    pub stop_after: Option<usize>,
}

impl TrainConfig {
    /// Defaults around a schedule: AdamW defaults, no accumulation, clipping at 1.0, no
    /// periodic evaluation or checkpoints, seed 0, no progress bar.
    pub fn new(schedule: LrSchedule, out_dir: impl Into<PathBuf>) -> Self {
        Self {
            schedule,
            adamw: AdamWConfig::default(),
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            eval_every: 0,
            save_every: 0,
            seed: 0,
            out_dir: out_dir.into(),
            progress: false,
            log_every: 0,
            base_model: None,
            stop_after: None,
        }
    }
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Every step's metrics, including those before a resume.
    pub history: Vec<MetricRecord>,
    /// Optimiser steps completed.
    pub steps: usize,
    /// The newest checkpoint.
    pub last_checkpoint: Option<PathBuf>,
    /// Folder of the final adapter (PEFT format).
    pub adapter_dir: PathBuf,
    /// Training tokens per second over this invocation.
    pub tokens_per_sec: f64,
}

/// Trains the adapters described by `spec` on `model`.
///
/// Attaches fresh adapters (or, with `resume`, those of the checkpoint), then runs the schedule's
/// steps. A resumed run continues the data stream, the dropout generator and the optimiser
/// where the checkpoint left them, so its losses equal those of an uninterrupted run. A loss or
/// gradient that is NaN or infinite stops the run before any update, with an error naming the
/// step and the last good checkpoint.
pub fn train(
    model: &mut dyn CausalLm,
    spec: &AdapterSpec,
    data: &mut DataLoader,
    valid: Option<&DataLoader>,
    cfg: &TrainConfig,
    resume: Option<&Path>,
) -> Result<TrainReport> {
    if cfg.grad_accum == 0 {
        return Err(Error::InvalidConfig {
            name: "grad_accum",
            value: "0".into(),
            expected: "at least 1",
        });
    }
    let out = &cfg.out_dir;
    std::fs::create_dir_all(out).map_err(|e| Error::Io {
        path: out.display().to_string(),
        source: e,
    })?;
    let checkpoints = out.join("checkpoints");
    let fingerprint = format!(
        "rank={} alpha={} targets={:?} rslora={} batch_rows={} data_rows={} grad_accum={} seed={}",
        spec.rank,
        spec.alpha,
        spec.targets,
        spec.use_rslora,
        data.batch_size(),
        data.rows().len(),
        cfg.grad_accum,
        cfg.seed
    );

    lora::attach_adapters(model, spec, cfg.seed)?;
    let mut state = TrainerState {
        step: 0,
        data_position: data.position(),
        rng_state: TrainRng::new(cfg.seed).state(),
        seed: cfg.seed,
        fingerprint: fingerprint.clone(),
        history: Vec::new(),
    };
    let mut last_checkpoint = None;
    if let Some(path) = resume {
        let dir = checkpoint::resolve_checkpoint(path)?;
        state = checkpoint::read_state(&dir)?;
        if state.fingerprint != fingerprint {
            return Err(Error::Msg(format!(
                "{}: the checkpoint was made with other settings, so resuming would not continue the same run.\n  checkpoint: {}\n  this run:   {fingerprint}",
                dir.display(),
                state.fingerprint
            )));
        }
        PeftAdapter::load(&dir, model.device())?.apply(model)?;
        data.seek(state.data_position)?;
        last_checkpoint = Some(dir);
    }
    let mut optimizer = AdamW::new(lora::adapter_vars(model), cfg.adamw.clone())?;
    if let Some(dir) = &last_checkpoint {
        optimizer.load(&dir.join(OPTIMIZER_FILE))?;
        if optimizer.steps_taken() != state.step {
            return Err(Error::Msg(format!(
                "{}: optimiser state is at step {} but the trainer state at step {}",
                dir.display(),
                optimizer.steps_taken(),
                state.step
            )));
        }
    }
    let mut rng = TrainRng::from_state(state.rng_state);
    let mut metrics = MetricsLog::create(&out.join("metrics.jsonl"), &state.history)?;
    let total = cfg.schedule.total_steps;
    let end = cfg.stop_after.map_or(total, |s| s.min(total));
    let bar = progress_bar(cfg.progress, total as u64, state.step as u64);
    let run_start = Instant::now();
    let mut run_tokens = 0usize;

    lora::set_adapters_training(model, true);
    while state.step < end {
        let step_start = Instant::now();
        let lr = cfg.schedule.lr_at(state.step);
        let batches: Vec<Batch> = (0..cfg.grad_accum)
            .map(|_| data.next_batch(model.device()))
            .collect::<Result<_>>()?;
        let n_targets: usize = batches.iter().map(|b| b.n_targets).sum();
        let n_tokens: usize = batches.iter().map(|b| b.n_tokens).sum();
        let params = optimizer.params().to_vec();
        let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut loss_sum = 0f64;
        for (micro, batch) in batches.iter().enumerate() {
            lora::seed_adapter_dropout(model, rng.next_u64());
            let logits = model.forward_batch(batch)?;
            let loss = masked_cross_entropy_sum(&logits, &batch.targets, &batch.loss_mask)?;
            let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(diverged(
                    state.step + 1,
                    micro,
                    "loss",
                    value,
                    last_checkpoint.as_deref(),
                ));
            }
            loss_sum += value;
            let scaled = (loss / n_targets.max(1) as f64)?;
            let store = scaled.backward()?;
            for (i, (_, var)) in params.iter().enumerate() {
                if let Some(g) = store.get(var) {
                    grads[i] = Some(match grads[i].take() {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        let grad_norm = global_grad_norm(&grads)?;
        // Clipping is folded into the optimiser's update (no pass over the gradients).
        let grad_scale = cfg
            .max_grad_norm
            .map_or(1.0, |max| clip_factor(grad_norm, max));
        if !grad_norm.is_finite() {
            return Err(diverged(
                state.step + 1,
                cfg.grad_accum - 1,
                "gradient norm",
                grad_norm,
                last_checkpoint.as_deref(),
            ));
        }
        optimizer.step_scaled(&grads, lr, grad_scale)?;
        state.step += 1;
        state.data_position = data.position();
        state.rng_state = rng.state();

        let secs = step_start.elapsed().as_secs_f64();
        run_tokens += n_tokens;
        let mut record = MetricRecord {
            step: state.step,
            loss: loss_sum / n_targets.max(1) as f64,
            lr,
            grad_norm,
            tokens: n_tokens,
            tokens_per_sec: n_tokens as f64 / secs.max(1e-9),
            val_loss: None,
        };
        let last = state.step == end;
        if let Some(v) = valid {
            if (cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every)) || last {
                lora::set_adapters_training(model, false);
                record.val_loss = Some(evaluate(model, v)?);
                lora::set_adapters_training(model, true);
            }
        }
        metrics.append(&record)?;
        let line = format_record(&record, total);
        if cfg.log_every > 0
            && (state.step.is_multiple_of(cfg.log_every) || last || record.val_loss.is_some())
        {
            bar.suspend(|| eprintln!("{line}"));
        }
        bar.set_message(line);
        bar.set_position(state.step as u64);
        state.history.push(record);

        if (cfg.save_every > 0 && state.step.is_multiple_of(cfg.save_every)) || last {
            let dir = checkpoint::write_checkpoint(&checkpoints, &state, |tmp| {
                lora::save_peft_adapter(model, spec, cfg.base_model.as_deref(), tmp)?;
                optimizer.save(&tmp.join(OPTIMIZER_FILE))
            })?;
            last_checkpoint = Some(dir);
        }
    }
    lora::set_adapters_training(model, false);
    bar.finish_and_clear();

    let adapter_dir = out.join("adapter");
    lora::save_peft_adapter(model, spec, cfg.base_model.as_deref(), &adapter_dir)?;
    if !state.history.is_empty() {
        super::plot::plot_loss_curve(&state.history, &out.join("loss.png"))?;
    }
    Ok(TrainReport {
        history: state.history,
        steps: state.step,
        last_checkpoint,
        adapter_dir,
        tokens_per_sec: run_tokens as f64 / run_start.elapsed().as_secs_f64().max(1e-9),
    })
}

/// Mean loss per target token over every batch of `data` (adapters in inference mode).
pub fn evaluate(model: &dyn CausalLm, data: &DataLoader) -> Result<f64> {
    let (mut sum, mut count) = (0f64, 0usize);
    for batch in data.all_batches(model.device())? {
        let logits = model.forward_batch(&batch)?;
        let loss = masked_cross_entropy_sum(&logits, &batch.targets, &batch.loss_mask)?;
        sum += loss
            .detach()
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        count += batch.n_targets;
    }
    Ok(sum / count.max(1) as f64)
}

fn diverged(step: usize, micro: usize, what: &str, value: f64, last: Option<&Path>) -> Error {
    let keep = match last {
        Some(p) => format!(
            "the last good checkpoint is {} (resume from it with a lower learning rate)",
            p.display()
        ),
        None => "no checkpoint had been written yet".to_string(),
    };
    Error::Msg(format!(
        "training stopped: the {what} became {value} at step {step} (micro-batch {micro}); no update was applied and {keep}"
    ))
}

fn format_record(r: &MetricRecord, total: usize) -> String {
    let val = r
        .val_loss
        .map(|v| format!(" val {v:.4}"))
        .unwrap_or_default();
    format!(
        "step {:>width$}/{total}  loss {:.4}{val}  lr {:.2e}  grad {:.3}  {:.0} tok/s",
        r.step,
        r.loss,
        r.lr,
        r.grad_norm,
        r.tokens_per_sec,
        width = total.to_string().len()
    )
}

fn progress_bar(show: bool, total: u64, done: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{bar:28.cyan/blue} {msg}  [{elapsed_precise} < {eta_precise}]",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_position(done);
    bar
}
