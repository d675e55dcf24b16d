//! Tests of the llama-family model and its loaders on tiny random models (no downloads).

mod batches;
mod common;
mod golden;
mod load;
mod lora;
mod reference;
