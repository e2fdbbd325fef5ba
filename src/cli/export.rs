//! `famc export`: a checkpoint compiled into ONNX graphs, optionally with a Triton repository.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use famc::model::Checkpoint;

use super::common::{note_zero_prompt, FamArgs};

/// Arguments of `famc export`.
#[derive(Args)]
pub struct ExportArgs {
    /// Checkpoint directory (config.json + safetensors).
    pub model: PathBuf,
    #[command(flatten)]
    pub fam: FamArgs,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Initializers larger than this many bytes go to the weight store `weights.data`.
    #[arg(long, default_value_t = famc::export::DEFAULT_EXTERNAL_THRESHOLD)]
    pub external_threshold: usize,
    /// Element type of the stored weight matrices: f32, f16 or bf16 (computation stays f32),
    /// or q8 / q4: blockwise int8 / int4 matrices (ONNX Runtime's MatMulNBits, block 32) with
    /// an int8 embedding (tract runs q4 packed and q8 widened to f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16", "q8", "q4"])]
    pub dtype: String,
    /// q8/q4: the precision ONNX Runtime computes the quantized products in (MatMulNBits'
    /// accuracy_level): 4 for its int8 kernels (faster), 1 for f32 against the dequantized
    /// weights.
    #[arg(long, default_value_t = famc::export::DEFAULT_ACCURACY_LEVEL)]
    pub accuracy_level: i64,
    /// q8 only: int8 activations. Each activation row is quantized to int8 and multiplied by
    /// per-channel int8 weights (MatMulInteger), about 3x faster products in prefill, at a
    /// perplexity cost that docs/BENCHMARKS.md states; f32 (the default) keeps them exact.
    #[arg(long, value_enum, default_value_t = famc::export::Activations::F32)]
    pub activations: famc::export::Activations,
    /// The ONNX dialect: opset17 (primitives, any runtime) or opset23 (fused Attention,
    /// RMSNormalization and RotaryEmbedding; ONNX Runtime 1.31, tract ≥ 0.23, TensorRT ≥ 10.15).
    #[arg(long, value_enum, default_value_t = famc::onnx::Target::default())]
    pub target: famc::onnx::Target,
    #[command(flatten)]
    pub triton: TritonArgs,
}

/// A Triton Inference Server model repository beside the export (docs/serving.md).
#[derive(Args)]
pub struct TritonArgs {
    /// Also write a Triton model repository here: the block graph with Triton's sequence
    /// batcher and implicit state (config.pbtxt, initial state, README).
    #[arg(long, value_name = "REPO_DIR")]
    pub triton: Option<PathBuf>,
    /// The model's name in the repository.
    #[arg(long, default_value = "famc", requires = "triton")]
    pub triton_model_name: String,
    /// Triton's max_batch_size: sequences batched into one call.
    #[arg(long, default_value_t = 8, requires = "triton")]
    pub triton_max_batch_size: usize,
    /// The sequence batcher's strategy.
    #[arg(long, value_enum, default_value_t = famc::triton::Strategy::Oldest, requires = "triton")]
    pub triton_strategy: famc::triton::Strategy,
    /// oldest: sequences considered for a batch at once.
    #[arg(long, default_value_t = 64, requires = "triton")]
    pub triton_max_candidates: usize,
    /// oldest: batch sizes Triton prefers (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "triton")]
    pub triton_preferred_batch_size: Vec<usize>,
    /// oldest: microseconds a request may wait for others to join its batch.
    #[arg(long, default_value_t = 1000, requires = "triton")]
    pub triton_queue_delay_us: u64,
    /// Microseconds after which Triton ends an idle sequence.
    #[arg(long, default_value_t = 60_000_000, requires = "triton")]
    pub triton_idle_us: u64,
    /// Place the model's instances on the GPU (instance_group KIND_GPU).
    #[arg(long, requires = "triton")]
    pub triton_gpu: bool,
    /// Model instances.
    #[arg(long, default_value_t = 1, requires = "triton")]
    pub triton_instances: usize,
    /// Run the graph through TensorRT (ONNX Runtime's accelerator) at this precision.
    #[arg(long, value_enum, requires = "triton")]
    pub triton_tensorrt: Option<famc::triton::TrtPrecision>,
}

impl TritonArgs {
    /// The library's options for these flags.
    pub fn options(&self) -> famc::triton::TritonOptions {
        famc::triton::TritonOptions {
            model_name: self.triton_model_name.clone(),
            max_batch_size: self.triton_max_batch_size,
            strategy: self.triton_strategy,
            max_candidate_sequences: self.triton_max_candidates,
            preferred_batch_sizes: self.triton_preferred_batch_size.clone(),
            max_queue_delay_us: self.triton_queue_delay_us,
            max_sequence_idle_us: self.triton_idle_us,
            gpu: self.triton_gpu,
            instances: self.triton_instances,
            tensorrt: self.triton_tensorrt,
        }
    }
}

/// Runs `famc export`.
pub fn run(args: ExportArgs) -> Result<()> {
    if args.triton.triton.is_some() {
        famc::triton::check_options(&args.triton.options())?;
    }
    let ck = Checkpoint::load(&args.model)?;
    let fam = ck.fam_params(args.fam.into())?;
    note_zero_prompt(&ck, &fam);
    let opts = famc::export::ExportOptions {
        external_threshold: args.external_threshold,
        dtype: args.dtype.parse()?,
        accuracy_level: args.accuracy_level,
        target: args.target,
        activations: args.activations,
    };
    let m = famc::export::export(&ck, fam, &args.out, &opts)?;
    eprintln!(
        "exported {} to {} (L={}, F={}, M={}, {} state tensors)",
        args.model.display(),
        args.out.display(),
        fam.block_len,
        fam.fam_len,
        fam.mem_blocks,
        m.state.len()
    );
    if let Some(repo) = &args.triton.triton {
        let t = args.triton.options();
        famc::triton::write_repository(&args.out, repo, &t)?;
        eprintln!(
            "wrote the Triton model repository {} (model `{}`, {:?} sequence batching, max_batch_size {})",
            repo.display(),
            t.model_name,
            t.strategy,
            t.max_batch_size
        );
    }
    Ok(())
}
