//! Fine-tuning: data, loss, AdamW, schedules, the training loop, checkpoints and metrics.

mod adamw_update;
mod checkpoint;
pub mod data;
mod llama;
mod loss;
mod metrics;
mod model;
mod optimizer;
mod plot;
pub mod rng;
mod schedule;
mod trainer;

pub use checkpoint::{checkpoint_dir, read_state, resolve_checkpoint, TrainerState};
pub use loss::masked_cross_entropy_sum;
pub use metrics::{MetricRecord, MetricsLog};
pub use model::CausalLm;
pub use optimizer::{clip_factor, clip_grad_norm, global_grad_norm, AdamW, AdamWConfig};
pub use plot::plot_loss_curve;
pub use schedule::{LrSchedule, ScheduleKind};
pub use trainer::{evaluate, train, TrainConfig, TrainReport};
