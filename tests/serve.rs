//! `famc serve` (KServe v2 over HTTP) and `famc export --triton` (a Triton model repository),
//! checked against the f64 reference: through Triton's own client (tritonclient.http), through
//! an emulation of Triton's sequence batcher on ONNX Runtime, and with raw HTTP for bad requests.
//!
//! Servers listen on 127.0.0.1 with a port the system picks; every server is killed when its
//! test ends.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_clean_failure, famc, temp_checkpoint, Rng, Spec};
use famc::model::{Checkpoint, FamDefaults};
use famc::reference::Reference;
use serde_json::{json, Value};

const FAM: [&str; 6] = ["--block-len", "4", "--fam-len", "2", "--mem-blocks", "2"];

fn python() -> Option<PathBuf> {
    common::python_with("onnxruntime, numpy, tritonclient.http, tritonclient.grpc.model_config_pb2")
}

fn script(name: &str) -> String {
    common::export_script(name).display().to_string()
}

/// A checkpoint with a learned FAM prompt, GQA (4 query / 2 kv heads), vocabulary 40.
fn checkpoint() -> (tempfile::TempDir, PathBuf) {
    let spec = Spec {
        fam_init_rows: Some(2),
        ..Spec::default()
    };
    let (tmp, dir, _) = temp_checkpoint(&spec);
    (tmp, dir)
}

fn export(ck: &Path, out: &Path, extra: &[&str]) {
    let o = famc(
        &[
            &[
                "export",
                ck.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ][..],
            &FAM[..],
            extra,
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
}

fn reference(ck: &Path) -> Reference {
    let ck = Checkpoint::load(ck).unwrap();
    let fam = ck
        .fam_params(FamDefaults {
            block_len: Some(4),
            fam_len: Some(2),
            mem_blocks: Some(2),
        })
        .unwrap();
    Reference::new(&ck, fam).unwrap()
}

/// `n` sequences of 9 to 40 tokens (up to 10 blocks), each as seqNN.txt with its f64
/// reference logits as seqNN.npy.
fn write_case(ck: &Path, dir: &Path, n: usize, seed: u64) -> Vec<Vec<u32>> {
    std::fs::create_dir_all(dir).unwrap();
    let reference = reference(ck);
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|k| {
            let len = 9 + rng.below(32) as usize;
            let ids = rng.tokens(len, 40);
            let text: Vec<String> = ids.iter().map(u32::to_string).collect();
            std::fs::write(dir.join(format!("seq{k:02}.txt")), text.join(" ")).unwrap();
            let logits = reference.forward(&ids).unwrap().mapv(|v| v as f32);
            famc::io::write_npy_f32(&dir.join(format!("seq{k:02}.npy")), logits.view()).unwrap();
            ids
        })
        .collect()
}

fn run_python(py: &Path, args: &[&str]) -> Value {
    let o = Command::new(py).args(args).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{args:?}: {out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

#[test]
fn triton_repository_matches_the_reference_under_emulated_sequence_batching() {
    let Some(py) = python() else { return };
    let (tmp, ck) = checkpoint();
    let case = tmp.path().join("case");
    write_case(&ck, &case, 6, 11);
    for (strategy, target) in [
        ("oldest", "opset17"),
        ("direct", "opset17"),
        ("oldest", "opset23"),
    ] {
        let out = tmp.path().join(format!("export-{strategy}-{target}"));
        let repo = tmp.path().join(format!("repo-{strategy}-{target}"));
        export(
            &ck,
            &out,
            &[
                "--target",
                target,
                "--triton",
                repo.to_str().unwrap(),
                "--triton-strategy",
                strategy,
                "--triton-max-batch-size",
                "4",
                "--triton-preferred-batch-size",
                "2,4",
            ],
        );
        for file in [
            "README.md",
            "famc-triton.json",
            "famc/config.pbtxt",
            "famc/1/model.onnx",
        ] {
            assert!(repo.join(file).is_file(), "{file} missing");
        }
        // F = 2 rows of d = 16 f32 per layer, computed by the init graph
        for l in ["L00", "L01"] {
            let f = repo.join(format!("famc/initial_state/{l}.fam"));
            assert_eq!(std::fs::metadata(&f).unwrap().len(), 2 * 16 * 4);
        }
        let r = run_python(
            &py,
            &[
                &script("triton_emulate.py"),
                "--repo",
                repo.to_str().unwrap(),
                "--case",
                case.to_str().unwrap(),
            ],
        );
        assert_eq!(r["strategy"], strategy);
        assert_eq!(r["problems"], json!([]), "{r}");
        assert_eq!(r["sequences"], 6);
        assert!(r["largest_batch"].as_u64().unwrap() > 1, "{r}");
        assert!(r["max_abs_diff"].as_f64().unwrap() < 1e-4, "{target}: {r}");
    }
}

#[test]
fn triton_options_are_checked_before_anything_is_written() {
    let (tmp, ck) = checkpoint();
    let out = tmp.path().join("out");
    let repo = tmp.path().join("repo");
    let (c, o, r) = (
        ck.to_str().unwrap(),
        out.to_str().unwrap(),
        repo.to_str().unwrap(),
    );
    let args = |extra: &[&'static str]| -> Vec<String> {
        ["export", c, "--out", o, "--triton", r]
            .iter()
            .chain(FAM.iter())
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let famc = |a: Vec<String>| famc(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let o = famc(args(&[
        "--triton-max-batch-size",
        "4",
        "--triton-preferred-batch-size",
        "8",
    ]));
    assert_clean_failure(&o, "--triton-preferred-batch-size 8");
    let o = famc(args(&["--triton-model-name", "a/b"]));
    assert_clean_failure(&o, "--triton-model-name");
    assert!(!out.exists() && !repo.exists());
    // a directory that is not a repository famc wrote is never replaced
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("mine.txt"), "keep").unwrap();
    let o = famc(args(&[]));
    assert_clean_failure(&o, "is not a famc Triton repository");
    assert_eq!(
        std::fs::read_to_string(repo.join("mine.txt")).unwrap(),
        "keep"
    );
}

/// A `famc serve` child process, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_famc"))
            .args(["serve", model.to_str().unwrap(), "--addr", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Server { child, addr }
    }

    /// One HTTP/1.1 request; the status and the body as JSON.
    fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw);
        let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        let json = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap_or_else(|_| json!({ "raw": body }))
        };
        (status, json)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.request("POST", path, body.to_string().as_bytes())
    }

    fn stats(&self) -> Value {
        let (status, v) = self.request("GET", "/v2/models/famc/stats", b"");
        assert_eq!(status, 200);
        v["model_stats"][0].clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn infer_body(ids: &[u32], seq: Option<(u64, bool, bool)>) -> Value {
    let mut v = json!({
        "inputs": [{ "name": "input_ids", "shape": [1, ids.len()], "datatype": "INT64", "data": ids }],
    });
    if let Some((id, start, end)) = seq {
        v["parameters"] =
            json!({ "sequence_id": id, "sequence_start": start, "sequence_end": end });
    }
    v
}

fn logits_of(v: &Value) -> Vec<f32> {
    v["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn sixteen_interleaved_sequences_over_tritonclient_match_the_reference() {
    let Some(py) = python() else { return };
    let (tmp, ck) = checkpoint();
    let out = tmp.path().join("export");
    export(&ck, &out, &[]);
    let case = tmp.path().join("case");
    write_case(&ck, &case, 16, 5);
    for backend in common::backends() {
        let server = Server::start(
            &out,
            &[
                "--backend",
                backend.name(),
                "--max-batch-size",
                "8",
                "--batch-delay-us",
                "2000",
            ],
        );
        // any number of tokens per request; or whole blocks, the last padded, as Triton takes them
        for mode in [["--chunk", "random"], ["--chunk", "3"], ["--block", "4"]] {
            let chunk = mode.join(" ");
            let r = run_python(
                &py,
                &[
                    &script("triton_client.py"),
                    "--url",
                    &server.addr,
                    "--check",
                    case.to_str().unwrap(),
                    mode[0],
                    mode[1],
                ],
            );
            assert_eq!(r["errors"], json!([]), "{backend:?} {chunk}: {r}");
            assert_eq!(r["ok"], 16);
            assert!(
                r["max_abs_diff"].as_f64().unwrap() < 1e-4,
                "{backend:?} {chunk}: {r}"
            );
        }
        let stats = server.stats();
        assert!(
            stats["largest_batch"].as_u64().unwrap() > 1,
            "never batched: {stats}"
        );
        assert_eq!(stats["live_sequences"], 0, "{stats}");
        // the load test, bounded in count (8 × 3 blocks) and time (60 s)
        let pid = server.child.id().to_string();
        let r = run_python(
            &py,
            &[
                &script("load_test.py"),
                "--url",
                &server.addr,
                "--sequences",
                "8",
                "--blocks",
                "3",
                "--tokens",
                "4",
                "--vocab",
                "40",
                "--max-seconds",
                "60",
                "--server-pid",
                &pid,
            ],
        );
        assert_eq!(r["requests"], 24, "{r}");
        assert!(r["server_peak_rss_mib"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn bad_requests_get_a_clear_4xx_and_leave_other_sequences_untouched() {
    let (tmp, ck) = checkpoint();
    let out = tmp.path().join("export");
    export(&ck, &out, &[]);
    let ids = Rng::new(3).tokens(14, 40);
    let want = reference(&ck).forward(&ids).unwrap();
    let server = Server::start(
        &out,
        &[
            "--max-sequences",
            "2",
            "--max-tokens",
            "64",
            "--max-body-bytes",
            "100000",
        ],
    );
    let infer = "/v2/models/famc/infer";

    // sequence 1 runs its first 6 tokens, then every bad request below, then the rest
    let (status, first) = server.post(infer, &infer_body(&ids[..6], Some((1, true, false))));
    assert_eq!(status, 200, "{first}");

    let bad: Vec<(&str, u16, Value, &str)> = vec![
        (
            "unknown model",
            404,
            infer_body(&ids, None),
            "unknown model",
        ),
        (
            "id >= V",
            400,
            infer_body(&[1, 40], None),
            "token id 40 at offset 1",
        ),
        (
            "wrong dtype",
            400,
            json!({"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}),
            "datatype",
        ),
        (
            "wrong shape",
            400,
            json!({"inputs": [{"name": "input_ids", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}]}),
            "shape [2, 2]",
        ),
        (
            "count and shape differ",
            400,
            json!({"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2]}]}),
            "but 2 values",
        ),
        (
            "unknown input",
            400,
            json!({"inputs": [{"name": "pixels", "shape": [1], "datatype": "INT64", "data": [1]}]}),
            "unknown input `pixels`",
        ),
        (
            "unknown output",
            400,
            json!({"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [1]}], "outputs": [{"name": "probs"}]}),
            "unknown output `probs`",
        ),
        (
            "start on a live sequence",
            409,
            infer_body(&ids[..2], Some((1, true, false))),
            "already live",
        ),
        (
            "unknown sequence",
            400,
            infer_body(&ids[..2], Some((9, false, false))),
            "sequence 9 is not live",
        ),
        (
            "too many tokens",
            413,
            infer_body(&[1; 65], None),
            "at most 64",
        ),
        (
            "bad sequence flag",
            400,
            json!({"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [1]}], "parameters": {"sequence_id": 1, "sequence_start": "yes"}}),
            "sequence_start",
        ),
    ];
    for (what, status, body, needle) in bad {
        let path = if what == "unknown model" {
            "/v2/models/nope/infer"
        } else {
            infer
        };
        let (got, v) = server.post(path, &body);
        assert_eq!(got, status, "{what}: {v}");
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error in {v}"));
        assert!(msg.contains(needle), "{what}: `{needle}` not in {msg}");
    }
    let (status, v) = server.request("POST", infer, b"{not json");
    assert_eq!(status, 400, "{v}");
    let (status, v) = server.request("POST", infer, &vec![b' '; 200_000]);
    assert_eq!(status, 413, "{v}");
    let (status, v) = server.request("GET", "/v2/nothing", b"");
    assert_eq!(status, 404, "{v}");
    // max sequences: 1 is live, 2 starts, 3 is refused
    assert_eq!(
        server
            .post(infer, &infer_body(&ids[..1], Some((2, true, false))))
            .0,
        200
    );
    let (status, v) = server.post(infer, &infer_body(&ids[..1], Some((3, true, false))));
    assert_eq!(status, 429, "{v}");

    let (status, rest) = server.post(infer, &infer_body(&ids[6..], Some((1, false, true))));
    assert_eq!(status, 200, "{rest}");
    let got: Vec<f32> = logits_of(&first)
        .into_iter()
        .chain(logits_of(&rest))
        .collect();
    assert_eq!(got.len(), want.len());
    let diff = got
        .iter()
        .zip(want.iter())
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-4, "sequence 1 after the bad requests: {diff}");
    // sequence 1 ended: it is no longer live
    let (status, _) = server.post(infer, &infer_body(&ids[..1], Some((1, false, false))));
    assert_eq!(status, 400);
}

#[test]
fn idle_sequences_are_ended_and_their_state_freed() {
    let (tmp, ck) = checkpoint();
    let out = tmp.path().join("export");
    export(&ck, &out, &[]);
    let server = Server::start(&out, &["--idle-timeout", "0.5"]);
    let infer = "/v2/models/famc/infer";
    // a client that goes away mid-sequence: started, never ended
    assert_eq!(
        server
            .post(infer, &infer_body(&[1, 2, 3], Some((7, true, false))))
            .0,
        200
    );
    assert_eq!(server.stats()["live_sequences"], 1);
    let t0 = Instant::now();
    while server.stats()["live_sequences"] != 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "never evicted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(server.stats()["evicted_sequences"], 1);
    let (status, v) = server.post(infer, &infer_body(&[4], Some((7, false, false))));
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("idle"), "{v}");
}

fn softmax_nll(row: ndarray::ArrayView1<f64>, target: u32) -> f64 {
    let max = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    let lse = row.iter().map(|x| (x - max).exp()).sum::<f64>().ln() + max;
    lse - row[target as usize]
}

#[test]
fn score_and_generate_endpoints_match_the_reference() {
    let (tmp, ck) = checkpoint();
    // a word-level tokenizer over the vocabulary: "w0" … "w39"
    let vocab: serde_json::Map<String, Value> =
        (0..40).map(|i| (format!("w{i}"), i.into())).collect();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    std::fs::write(ck.join("tokenizer.json"), tok.to_string()).unwrap();
    let out = tmp.path().join("export");
    export(&ck, &out, &[]);
    let server = Server::start(&out, &[]);
    let reference = reference(&ck);
    let ids = Rng::new(9).tokens(19, 40);

    let logits = reference.forward(&ids).unwrap();
    let want = (0..ids.len() - 1)
        .map(|i| softmax_nll(logits.row(i), ids[i + 1]))
        .sum::<f64>()
        / (ids.len() - 1) as f64;
    let (status, by_ids) = server.post("/v2/models/famc/score", &json!({ "input_ids": ids }));
    assert_eq!(status, 200, "{by_ids}");
    assert!(
        (by_ids["mean_nll"].as_f64().unwrap() - want).abs() < 1e-4,
        "{by_ids} vs {want}"
    );
    assert_eq!(by_ids["scored"], 18);
    let text: Vec<String> = ids.iter().map(|i| format!("w{i}")).collect();
    let (status, by_text) = server.post(
        "/v2/models/famc/score",
        &json!({ "text_input": text.join(" ") }),
    );
    assert_eq!(status, 200, "{by_text}");
    assert!(
        (by_text["mean_nll"].as_f64().unwrap() - want).abs() < 1e-4,
        "{by_text}"
    );

    // greedy generation: each next token the reference's argmax after the tokens so far
    let mut seq = ids[..6].to_vec();
    for _ in 0..7 {
        let l = reference.forward(&seq).unwrap();
        let last = l.row(seq.len() - 1);
        let best = (0..40).fold(0, |b, i| if last[i] > last[b] { i } else { b });
        seq.push(best as u32);
    }
    let (status, g) = server.post(
        "/v2/models/famc/generate",
        &json!({ "input_ids": &ids[..6], "parameters": { "max_tokens": 7, "ignore_eos": true } }),
    );
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["output_ids"], json!(&seq[6..]), "{g}");
    let (status, g) = server.post(
        "/v2/models/famc/generate",
        &json!({ "text_input": text[..6].join(" "), "parameters": { "max_tokens": 7, "ignore_eos": true } }),
    );
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["output_ids"], json!(&seq[6..]), "{g}");
    assert!(
        g["text_output"]
            .as_str()
            .unwrap()
            .starts_with(&format!("w{}", seq[6])),
        "{g}"
    );

    let (status, v) = server.post(
        "/v2/models/famc/generate",
        &json!({ "text_input": "w1", "max_tokens": -1 }),
    );
    assert_eq!(status, 400, "{v}");
    let (status, v) = server.post("/v2/models/famc/score", &json!({ "input_ids": [1, 99] }));
    assert_eq!(status, 400, "{v}");
}

#[test]
fn sigterm_stops_the_server_gracefully() {
    let (tmp, ck) = checkpoint();
    let out = tmp.path().join("export");
    export(&ck, &out, &[]);
    let mut server = Server::start(&out, &[]);
    assert_eq!(server.request("GET", "/v2/health/ready", b"").0, 200);
    let pid = server.child.id() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(TcpStream::connect(&server.addr).is_err());
}
