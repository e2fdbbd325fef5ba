//! Generation: the loop on a fake model, and FAM decoding against the reference.

mod common;

use common::*;
use famc::generate::{generate, FamDecoder, GenerateOptions, LanguageModel, Sampling};
use famc::model::{Checkpoint, FamParams};
use famc::reference::Reference;
use famc::runtime::{BackendKind, RunOptions};
use famc::session::FamModel;

/// Logits that favour (last + 1) mod V, with a little preference for the next ones too.
struct Fake {
    vocab: usize,
    fed: Vec<u32>,
}

impl LanguageModel for Fake {
    fn feed(&mut self, tokens: &[u32]) -> famc::Result<Vec<f32>> {
        self.fed.extend_from_slice(tokens);
        let last = *self.fed.last().unwrap() as usize;
        Ok((0..self.vocab)
            .map(|i| -(((i + self.vocab - last - 1) % self.vocab) as f32))
            .collect())
    }
}

fn opts(n: usize, sampling: Sampling, stop: Vec<u32>) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        sampling,
        stop_tokens: stop,
    }
}

#[test]
fn the_loop_on_a_fake_model() {
    let mut m = Fake {
        vocab: 10,
        fed: vec![],
    };
    let got: Vec<u32> = generate(&mut m, &[3], &opts(5, Sampling::Greedy, vec![]))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(got, vec![4, 5, 6, 7, 8]);
    // the prompt is fed once, then each token but the last
    assert_eq!(m.fed, vec![3, 4, 5, 6, 7]);

    let mut m = Fake {
        vocab: 10,
        fed: vec![],
    };
    let got: Vec<u32> = generate(&mut m, &[3], &opts(9, Sampling::Greedy, vec![7]))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(got, vec![4, 5, 6], "stops before the stop token");

    let random = |seed| Sampling::Random {
        temperature: 1.5,
        top_k: None,
        top_p: None,
        seed,
    };
    let run = |s: Sampling| -> Vec<u32> {
        let mut m = Fake {
            vocab: 10,
            fed: vec![],
        };
        generate(&mut m, &[0], &opts(40, s, vec![]))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(run(random(7)), run(random(7)), "a seed reproduces");
    assert_ne!(run(random(7)), run(random(8)));
    let top1 = Sampling::Random {
        temperature: 1.0,
        top_k: Some(1),
        top_p: None,
        seed: 3,
    };
    assert_eq!(run(top1), run(Sampling::Greedy), "top-k 1 is greedy");
    let tiny_p = Sampling::Random {
        temperature: 1.0,
        top_k: None,
        top_p: Some(1e-6),
        seed: 3,
    };
    assert_eq!(
        run(tiny_p),
        run(Sampling::Greedy),
        "a tiny top-p keeps the best token only"
    );
    // top-k 2 only ever picks the two best
    let top2 = Sampling::Random {
        temperature: 5.0,
        top_k: Some(2),
        top_p: None,
        seed: 11,
    };
    let got = run(top2);
    let mut prev = 0u32;
    for t in got {
        assert!(
            t == (prev + 1) % 10 || t == (prev + 2) % 10,
            "{t} after {prev}"
        );
        prev = t;
    }
    let bad = Sampling::Random {
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 0,
    };
    assert!(generate(
        &mut Fake {
            vocab: 3,
            fed: vec![]
        },
        &[0],
        &opts(1, bad, vec![])
    )
    .is_err());
    assert!(generate(
        &mut Fake {
            vocab: 3,
            fed: vec![]
        },
        &[],
        &opts(1, Sampling::Greedy, vec![])
    )
    .is_err());
}

fn argmax(row: ndarray::ArrayView1<f64>) -> u32 {
    row.iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0 as u32
}

#[test]
fn greedy_generation_equals_the_reference_across_block_boundaries() {
    for (spec, p) in [
        (
            Spec {
                fam_init_rows: Some(2),
                ..Spec::default()
            },
            FamParams {
                block_len: 4,
                fam_len: 2,
                mem_blocks: 1,
            },
        ),
        (
            Spec {
                seed: 3,
                kv_heads: 1,
                ..Spec::default()
            },
            FamParams {
                block_len: 3,
                fam_len: 0,
                mem_blocks: 2,
            },
        ),
        (
            Spec {
                seed: 4,
                qkv_bias: true,
                fam_init_rows: Some(3),
                ..Spec::default()
            },
            FamParams {
                block_len: 5,
                fam_len: 3,
                mem_blocks: 0,
            },
        ),
    ] {
        let (_t, dir, _) = temp_checkpoint(&spec);
        let ck = Checkpoint::load(&dir).unwrap();
        let r = Reference::new(&ck, p).unwrap();
        let prompt = Rng::new(spec.seed).tokens(6, 40);
        let n_new = 4 * p.block_len + 1; // at least 3 boundaries inside generation
        let mut want = prompt.clone();
        for _ in 0..n_new {
            let logits = r.forward(&want).unwrap();
            want.push(argmax(logits.row(want.len() - 1)));
        }
        for (target, backend) in every_target_and_backend() {
            let m = FamModel::compile_for(&ck, p, target, backend, &RunOptions::default()).unwrap();
            let mut dec = FamDecoder::new(&m).unwrap();
            let got: Vec<u32> = generate(&mut dec, &prompt, &opts(n_new, Sampling::Greedy, vec![]))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert_eq!(got, want[prompt.len()..], "{target} {backend:?} {p:?}");
            assert_eq!(dec.position(), prompt.len() + n_new - 1);
        }
    }
}

#[test]
fn decode_graph_logits_equal_the_reference() {
    let spec = Spec {
        fam_init_rows: Some(2),
        ..Spec::default()
    };
    let (_t, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let ids = Rng::new(2).tokens(19, 40);
    for p in [
        FamParams {
            block_len: 4,
            fam_len: 2,
            mem_blocks: 2,
        },
        FamParams {
            block_len: 4,
            fam_len: 2,
            mem_blocks: 0,
        },
    ] {
        let want = Reference::new(&ck, p).unwrap().forward(&ids).unwrap();
        for (target, backend) in every_target_and_backend() {
            let m = FamModel::compile_for(&ck, p, target, backend, &RunOptions::default()).unwrap();
            let mut dec = FamDecoder::new(&m).unwrap();
            // one token at a time: every row comes from the decode graph
            let rows: Vec<Vec<f32>> = ids.iter().map(|&t| dec.feed(&[t]).unwrap()).collect();
            let decoded = famc::generate::stack_rows(&rows).unwrap().mapv(f64::from);
            let diff = max_abs_diff(decoded.iter(), want.iter());
            assert!(diff < 1e-4, "{target} {backend:?} {p:?}: {diff}");
        }
    }
}

#[test]
fn a_prompt_of_many_blocks_then_generation() {
    let spec = Spec {
        fam_init_rows: Some(2),
        seed: 12,
        ..Spec::default()
    };
    let (_t, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let p = FamParams {
        block_len: 4,
        fam_len: 2,
        mem_blocks: 1,
    };
    let r = Reference::new(&ck, p).unwrap();
    let prompt = Rng::new(1).tokens(4 * 25 + 2, 40);
    let mut want = prompt.clone();
    for _ in 0..3 {
        let logits = r.forward(&want).unwrap();
        want.push(argmax(logits.row(want.len() - 1)));
    }
    let m = FamModel::compile(&ck, p, BackendKind::Tract, &RunOptions::default()).unwrap();
    let mut dec = FamDecoder::new(&m).unwrap();
    let got: Vec<u32> = generate(&mut dec, &prompt, &opts(3, Sampling::Greedy, vec![]))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(got, want[prompt.len()..]);
}

fn ids_of(o: &std::process::Output) -> Vec<u32> {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect()
}

#[test]
fn cli_generate() {
    let spec = Spec {
        fam_init_rows: Some(2),
        ..Spec::default()
    };
    let (tmp, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let p = FamParams {
        block_len: 4,
        fam_len: 2,
        mem_blocks: 1,
    };
    let prompt = Rng::new(5).tokens(7, 40);
    let pf = tmp.path().join("p.txt");
    std::fs::write(
        &pf,
        prompt
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(" "),
    )
    .unwrap();
    let r = Reference::new(&ck, p).unwrap();
    let mut want = prompt.clone();
    for _ in 0..9 {
        let logits = r.forward(&want).unwrap();
        want.push(argmax(logits.row(want.len() - 1)));
    }
    let (d, pfs) = (dir.to_str().unwrap(), pf.to_str().unwrap());
    let base = [
        "generate",
        d,
        "--tokens",
        pfs,
        "--block-len",
        "4",
        "--mem-blocks",
        "1",
    ];
    let greedy = ids_of(&famc(
        &[&base[..], &["--max-new-tokens", "9", "--greedy"]].concat(),
    ));
    assert_eq!(greedy, want[prompt.len()..]);

    let stop = want[prompt.len() + 3].to_string();
    let stopped = ids_of(&famc(
        &[&base[..], &["--max-new-tokens", "9", "--stop-token", &stop]].concat(),
    ));
    let first_stop = want[prompt.len()..]
        .iter()
        .position(|t| t.to_string() == stop)
        .unwrap();
    assert_eq!(stopped, want[prompt.len()..prompt.len() + first_stop]);

    // the checkpoint's end-of-sequence ids stop generation, unless --ignore-eos
    let eos = want[prompt.len() + 2];
    let first_eos = want[prompt.len()..].iter().position(|&t| t == eos).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        format!("{{\"eos_token_id\": [{eos}]}}"),
    )
    .unwrap();
    let at_eos = ids_of(&famc(&[&base[..], &["--max-new-tokens", "9"]].concat()));
    assert_eq!(at_eos, want[prompt.len()..prompt.len() + first_eos]);
    let ignored = ids_of(&famc(
        &[&base[..], &["--max-new-tokens", "9", "--ignore-eos"]].concat(),
    ));
    assert_eq!(ignored, want[prompt.len()..]);
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": "x"}"#,
    )
    .unwrap();
    let o = famc(&[&base[..], &["--max-new-tokens", "2"]].concat());
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("generation_config.json")
            && String::from_utf8_lossy(&o.stderr).contains("eos_token_id"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_file(dir.join("generation_config.json")).unwrap();

    let sampled = |seed: &str| {
        ids_of(&famc(
            &[
                &base[..],
                &[
                    "--max-new-tokens",
                    "12",
                    "--temperature",
                    "2",
                    "--top-k",
                    "5",
                    "--seed",
                    seed,
                ],
            ]
            .concat(),
        ))
    };
    assert_eq!(sampled("4"), sampled("4"));
    assert_eq!(sampled("4").len(), 12);

    let o = famc(&[&base[..], &["--max-new-tokens", "2", "--stop-token", "99"]].concat());
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--stop-token 99"));
    let o = famc(&[
        "generate",
        d,
        "--prompt",
        "w1 w2",
        "--max-new-tokens",
        "2",
        "--block-len",
        "4",
    ]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no tokenizer.json")
    );
}
