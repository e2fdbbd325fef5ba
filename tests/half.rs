//! Half-precision exports: weights stored as f16 or bf16, logits close to the f32 export's.

mod common;

use common::*;
use famc::export::{self, ExportOptions, WeightDtype};
use famc::model::{Checkpoint, FamParams};
use famc::runtime::{BackendKind, RunOptions};
use famc::session::FamModel;

/// The documented tolerance (README, "Half precision"): max abs difference from the f32 export's
/// logits, as a fraction of their range (max − min). bfloat16 keeps 8 bits of mantissa to f16's 11.
fn tolerance(dtype: WeightDtype) -> f32 {
    match dtype {
        WeightDtype::F16 => 2e-2,
        _ => 5e-2,
    }
}

#[test]
fn f16_and_bf16_exports_stay_close_to_f32() {
    let spec = Spec {
        fam_init_rows: Some(3),
        hidden: 32,
        head_dim: 8,
        inter: 48,
        ..Spec::default()
    };
    let (tmp, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let p = FamParams {
        block_len: 4,
        fam_len: 3,
        mem_blocks: 2,
    };
    let ids = Rng::new(6).tokens(4 * 6 + 3, 40);
    let f32_dir = tmp.path().join("f32");
    export::export(&ck, p, &f32_dir, &ExportOptions::default()).unwrap();
    let base = FamModel::open(&f32_dir, BackendKind::Tract, &RunOptions::default())
        .unwrap()
        .run(&ids)
        .unwrap();
    let range = base.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
        - base.iter().cloned().fold(f32::INFINITY, f32::min);
    let f32_bytes = std::fs::metadata(f32_dir.join("block.onnx")).unwrap().len();
    for dtype in [WeightDtype::F16, WeightDtype::BF16] {
        let out = tmp.path().join(dtype.name());
        let m = export::export(
            &ck,
            p,
            &out,
            &ExportOptions {
                dtype,
                ..ExportOptions::default()
            },
        )
        .unwrap();
        assert_eq!(m.dtype, dtype.name());
        let bytes = std::fs::metadata(out.join("block.onnx")).unwrap().len();
        assert!(
            bytes * 10 < f32_bytes * 7,
            "{dtype:?}: {bytes} vs f32 {f32_bytes} bytes"
        );
        for backend in backends() {
            let got = FamModel::open(&out, backend, &RunOptions::default())
                .unwrap()
                .run(&ids)
                .unwrap();
            let diff = max_abs_diff_f32(got.iter(), base.iter());
            eprintln!(
                "{dtype:?} on {backend:?}: max abs diff {diff}, {:.4} of the range {range}",
                diff / range
            );
            assert!(
                diff <= tolerance(dtype) * range,
                "{dtype:?} on {backend:?}: {diff} vs range {range}"
            );
            assert!(
                diff > 0.0,
                "{dtype:?} on {backend:?}: identical to f32, so the weights were not rounded"
            );
        }
    }
}
