//! `famc serve`: the KServe v2 inference protocol over HTTP, as Triton Inference Server speaks
//! it, so that a client written for `famc serve` runs unchanged against a Triton fleet serving
//! the repository of `famc export --triton`.
//!
//! Each sequence (`parameters.sequence_id`, `sequence_start`, `sequence_end`) keeps its state
//! here between requests. A request may carry any number of tokens: they are buffered to block
//! boundaries, and the response holds the logits of exactly the tokens sent, equal to those of
//! one uninterrupted run. Concurrent sequences' blocks run as one batch ([`batcher`]).

pub mod batcher;
pub mod kserve;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use ndarray::{concatenate, s, Array2, Axis};
use serde_json::{json, Value as JsonValue};

use crate::error::{Error, Result};
use crate::generate::{generate, FamDecoder, GenerateOptions, Sampling};
use crate::session::{FamModel, StreamState};
use crate::stream::{Scorer, TextTokenizer};
use batcher::{BatchStats, Batcher};
use kserve::{ApiError, SequenceId};

/// How a server listens, batches and bounds what it holds.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// The model's name in the URLs (`/v2/models/<name>/…`).
    pub model_name: String,
    /// Live sequences at most; a start beyond that is refused (429).
    pub max_sequences: usize,
    /// A sequence without a request for this long is ended and its state freed.
    pub idle_timeout: Duration,
    /// Blocks of concurrent sequences run together, at most this many per call.
    pub max_batch: usize,
    /// How long the first waiting block waits for others to join its batch.
    pub batch_delay: Duration,
    /// Threads that gather and run batches, each on a block-graph runner of its own (`None`:
    /// as many as the model's block graph may run at once, [`crate::runtime::RunnerPool::limit`]).
    pub batch_workers: Option<usize>,
    /// Tokens per request at most (infer, score, and new tokens of generate).
    pub max_tokens: usize,
    /// Request bodies over this many bytes are refused (413).
    pub max_body_bytes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 8000)),
            model_name: "famc".into(),
            max_sequences: 256,
            idle_timeout: Duration::from_secs(600),
            max_batch: 8,
            batch_delay: Duration::from_micros(500),
            batch_workers: None,
            max_tokens: 8192,
            max_body_bytes: 16 << 20,
        }
    }
}

/// One sequence held by the server.
struct Sequence {
    /// `None` only while a block of it runs.
    state: Option<StreamState>,
    /// Tokens after the last full block.
    pending: Vec<u32>,
    /// How many of `pending` have had their logits returned.
    returned: usize,
    last_used: Instant,
    /// Ended (by `sequence_end`, an error or the idle timeout) while a request waited for it.
    gone: bool,
}

type SequenceSlot = Arc<tokio::sync::Mutex<Sequence>>;

struct App {
    model: Arc<FamModel>,
    tokenizer: Option<TextTokenizer>,
    eos: Vec<u32>,
    opts: ServeOptions,
    sequences: Mutex<HashMap<SequenceId, SequenceSlot>>,
    batcher: Batcher,
    batch_workers: usize,
    stats: Arc<BatchStats>,
    requests: AtomicU64,
    evicted: AtomicU64,
}

impl App {
    fn check_model(&self, name: &str) -> Result<(), ApiError> {
        if name == self.opts.model_name {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "unknown model `{name}`: this server serves `{}`",
                    self.opts.model_name
                ),
            ))
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<SequenceId, SequenceSlot>> {
        self.sequences.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_sequence(&self) -> Sequence {
        Sequence {
            state: Some(self.model.new_state()),
            pending: Vec::new(),
            returned: 0,
            last_used: Instant::now(),
            gone: false,
        }
    }

    /// Feeds `ids` to a sequence; the logits [ids.len(), V] of exactly those tokens.
    async fn feed(&self, seq: &mut Sequence, ids: &[u32]) -> Result<Array2<f32>> {
        let l = self.model.fam_params().block_len;
        let mut parts: Vec<Array2<f32>> = Vec::new();
        seq.pending.extend_from_slice(ids);
        loop {
            let full = seq.pending.len() >= l;
            if !full && seq.pending.len() == seq.returned {
                break;
            }
            let block = seq.pending[..seq.pending.len().min(l)].to_vec();
            let state = seq.state.take().expect("the state is back between blocks");
            let (state, logits) = self.batcher.run(state, block).await?;
            seq.state = Some(state);
            let logits = logits?;
            parts.push(logits.slice(s![seq.returned.., ..]).to_owned());
            if full {
                seq.pending.drain(..l);
                seq.returned = 0;
            } else {
                seq.returned = seq.pending.len();
            }
        }
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        concatenate(Axis(0), &views).map_err(|e| Error::Input(format!("no logits: {e}")))
    }

    fn remove(&self, id: &SequenceId) {
        self.table().remove(id);
    }
}

fn internal(e: Error) -> ApiError {
    match e {
        Error::Input(m) => ApiError::bad(m),
        other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

async fn read_body(app: &App, body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, app.opts.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body exceeds {} bytes (--max-body-bytes)",
                    app.opts.max_body_bytes
                ),
            )
        })
}

async fn infer(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    app.check_model(&name)?;
    let body = read_body(&app, body).await?;
    app.requests.fetch_add(1, Ordering::Relaxed);
    let vocab = app.model.manifest().model.vocab_size;
    let req = kserve::parse_infer(&headers, &body, vocab, app.opts.max_tokens)?;
    let control = req.sequence.clone();
    let slot: SequenceSlot = match &control.id {
        None => Arc::new(tokio::sync::Mutex::new(app.new_sequence())),
        Some(id) => {
            let mut table = app.table();
            if control.start {
                if table.contains_key(id) {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        format!("sequence {id} is already live: end it (sequence_end) before starting it again"),
                    ));
                }
                if table.len() >= app.opts.max_sequences {
                    return Err(ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        format!(
                            "{} sequences are live, the most this server holds (--max-sequences); end one or retry later",
                            table.len()
                        ),
                    ));
                }
                let slot = Arc::new(tokio::sync::Mutex::new(app.new_sequence()));
                table.insert(id.clone(), slot.clone());
                slot
            } else {
                table.get(id).cloned().ok_or_else(|| unknown_sequence(id))?
            }
        }
    };
    let mut seq = slot.lock_owned().await;
    if seq.gone {
        return Err(unknown_sequence(
            control.id.as_ref().expect("only kept sequences end"),
        ));
    }
    let result = app.feed(&mut seq, &req.ids).await;
    seq.last_used = Instant::now();
    let ended = control.end || control.id.is_none() || result.is_err();
    if ended {
        seq.gone = true;
        if let Some(id) = &control.id {
            app.remove(id);
        }
    }
    drop(seq);
    let logits = result.map_err(|e| {
        let mut e = internal(e);
        if let Some(id) = &control.id {
            e.message = format!("{}; sequence {id} was ended, its state is lost", e.message);
        }
        e
    })?;
    Ok(kserve::infer_response(
        &app.opts.model_name,
        req.id,
        control.id.as_ref(),
        &logits,
        req.binary_output,
    ))
}

fn unknown_sequence(id: &SequenceId) -> ApiError {
    ApiError::bad(format!(
        "sequence {id} is not live: start it with sequence_start (it may have ended or been idle past --idle-timeout)"
    ))
}

async fn infer_version(
    state: State<Arc<App>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if version != "1" {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("model `{name}` has one version, 1; not {version:?}"),
        ));
    }
    infer(state, Path(name), headers, body).await
}

async fn server_metadata() -> Json<JsonValue> {
    Json(json!({
        "name": "famc",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "sequence", "generate", "statistics"],
    }))
}

async fn model_metadata(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Json<JsonValue>, ApiError> {
    app.check_model(&name)?;
    let m = app.model.manifest();
    Ok(Json(json!({
        "name": app.opts.model_name,
        "versions": ["1"],
        "platform": format!("famc_{}", app.model.backend().name()),
        "inputs": [{ "name": kserve::INPUT_IDS, "datatype": "INT64", "shape": [1, -1] }],
        "outputs": [{ "name": kserve::LOGITS, "datatype": "FP32", "shape": [1, -1, m.model.vocab_size] }],
        "parameters": {
            "block_len": m.fam.block_len,
            "fam_len": m.fam.fam_len,
            "mem_blocks": m.fam.mem_blocks,
            "max_sequences": app.opts.max_sequences,
            "max_batch_size": app.opts.max_batch,
            "batch_workers": app.batch_workers,
            "max_tokens": app.opts.max_tokens,
            "idle_timeout_s": app.opts.idle_timeout.as_secs_f64(),
            "tokenizer": app.tokenizer.is_some(),
        },
    })))
}

async fn model_ready(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.check_model(&name)?;
    Ok(StatusCode::OK)
}

async fn model_stats(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Json<JsonValue>, ApiError> {
    app.check_model(&name)?;
    let live = app.table().len();
    let st = &app.stats;
    Ok(Json(json!({
        "model_stats": [{
            "name": app.opts.model_name,
            "version": "1",
            "inference_count": app.requests.load(Ordering::Relaxed),
            "execution_count": st.calls.load(Ordering::Relaxed),
            "blocks_run": st.blocks.load(Ordering::Relaxed),
            "largest_batch": st.largest.load(Ordering::Relaxed),
            "live_sequences": live,
            "evicted_sequences": app.evicted.load(Ordering::Relaxed),
        }]
    })))
}

fn text_field(body: &JsonValue, key: &str) -> Result<Option<String>, ApiError> {
    match body.get(key) {
        None | Some(JsonValue::Null) => Ok(None),
        Some(JsonValue::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ApiError::bad(format!(
            "`{key}` must be a string, got {other}"
        ))),
    }
}

/// The prompt or text of a generate/score request: `text_input` (tokenized with the model's
/// tokenizer) or `input_ids`.
fn request_ids(app: &App, body: &JsonValue) -> Result<Vec<u32>, ApiError> {
    let vocab = app.model.manifest().model.vocab_size;
    let ids = match (text_field(body, "text_input")?, body.get("input_ids")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad("give `text_input` or `input_ids`, not both"))
        }
        (Some(text), None) => {
            let tok = app.tokenizer.as_ref().ok_or_else(|| {
                ApiError::bad(
                    "the export has no tokenizer.json: send `input_ids` instead of `text_input`",
                )
            })?;
            tok.encode(&text, true).map_err(internal)?
        }
        (None, Some(JsonValue::Array(items))) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v.as_u64() {
                Some(id) if (id as usize) < vocab => Ok(id as u32),
                _ => Err(ApiError::bad(format!(
                    "`input_ids`: {v} at offset {i} is not a token id below vocab_size {vocab}"
                ))),
            })
            .collect::<Result<_, _>>()?,
        (None, Some(other)) => {
            return Err(ApiError::bad(format!(
                "`input_ids` must be an array of token ids, got {other}"
            )))
        }
        (None, None) => return Err(ApiError::bad("give `text_input` or `input_ids`")),
    };
    if ids.is_empty() {
        return Err(ApiError::bad("the request holds no tokens"));
    }
    if ids.len() > app.opts.max_tokens {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request holds {} tokens; this server takes at most {} (--max-tokens)",
                ids.len(),
                app.opts.max_tokens
            ),
        ));
    }
    Ok(ids)
}

fn param<'a>(body: &'a JsonValue, key: &str) -> Option<&'a JsonValue> {
    body.get("parameters")
        .and_then(|p| p.get(key))
        .or_else(|| body.get(key))
        .filter(|v| !v.is_null())
}

fn number_param(body: &JsonValue, key: &str) -> Result<Option<f64>, ApiError> {
    match param(body, key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("parameter `{key}` must be a number, got {v}"))),
    }
}

async fn parse_json(app: &App, body: Body) -> Result<JsonValue, ApiError> {
    let bytes = read_body(app, body).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad(format!("the request body is not JSON: {e}")))
}

/// The JSON body and token ids of a generate/score request to model `name`.
async fn text_request(
    app: &App,
    name: &str,
    body: Body,
) -> Result<(JsonValue, Vec<u32>), ApiError> {
    app.check_model(name)?;
    let body = parse_json(app, body).await?;
    app.requests.fetch_add(1, Ordering::Relaxed);
    let ids = request_ids(app, &body)?;
    Ok((body, ids))
}

/// Runs `f` on the model off the HTTP threads (generation and scoring run whole requests).
async fn blocking<T: Send + 'static>(
    app: &Arc<App>,
    what: &str,
    f: impl FnOnce(&FamModel) -> Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let model = app.model.clone();
    tokio::task::spawn_blocking(move || f(&model))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{what} panicked"),
            )
        })?
        .map_err(internal)
}

/// Triton's generate extension: `{"text_input": …, "parameters": {"max_tokens": N, …}}` gives
/// `{"text_output": …}`; `input_ids` instead of text gives `output_ids` too.
async fn generate_text(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>, ApiError> {
    let (body, prompt) = text_request(&app, &name, body).await?;
    let max_new = number_param(&body, "max_tokens")?.unwrap_or(16.0);
    if !(0.0..=app.opts.max_tokens as f64).contains(&max_new) || max_new.fract() != 0.0 {
        return Err(ApiError::bad(format!(
            "parameter `max_tokens` must be a whole number from 0 to {} (--max-tokens), got {max_new}",
            app.opts.max_tokens
        )));
    }
    let temperature = number_param(&body, "temperature")?;
    let sampling = match temperature {
        None | Some(0.0) => Sampling::Greedy,
        Some(t) => Sampling::Random {
            temperature: t as f32,
            top_k: number_param(&body, "top_k")?.map(|k| k as usize),
            top_p: number_param(&body, "top_p")?.map(|p| p as f32),
            seed: number_param(&body, "seed")?.unwrap_or(0.0) as u64,
        },
    };
    let ignore_eos = matches!(param(&body, "ignore_eos"), Some(JsonValue::Bool(true)));
    let options = GenerateOptions {
        max_new_tokens: max_new as usize,
        sampling,
        stop_tokens: if ignore_eos {
            Vec::new()
        } else {
            app.eos.clone()
        },
    };
    let tokens = blocking(&app, "generation", move |model| -> Result<Vec<u32>> {
        let mut decoder = FamDecoder::new(model)?;
        generate(&mut decoder, &prompt, &options)?.collect()
    })
    .await?;
    let mut out = json!({ "model_name": app.opts.model_name, "output_ids": tokens });
    if let Some(tok) = &app.tokenizer {
        out["text_output"] = json!(tok.decode(&tokens).map_err(internal)?);
    }
    Ok(Json(out))
}

/// `{"text_input": …}` or `{"input_ids": […]}` gives the mean negative log-likelihood and the
/// perplexity of the tokens after the first, as `famc score` computes them.
async fn score(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>, ApiError> {
    let (_, ids) = text_request(&app, &name, body).await?;
    let stats = blocking(&app, "scoring", move |model| {
        let mut scorer = Scorer::new(model);
        scorer.push(&ids)?;
        scorer.totals()
    })
    .await?;
    Ok(Json(json!({
        "model_name": app.opts.model_name,
        "tokens": stats.tokens,
        "scored": stats.scored,
        "mean_nll": stats.mean_nll(),
        "perplexity": stats.ppl(),
    })))
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint: see /v2 and /v2/models/<name>",
    )
}

/// Ends sequences idle past the timeout, every quarter of it (at most every second).
async fn evict_idle(app: Arc<App>) {
    let period =
        (app.opts.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let mut table = app.table();
        let before = table.len();
        table.retain(|_, slot| match slot.try_lock() {
            // a sequence with a request in flight or waiting is not idle
            Err(_) => true,
            Ok(mut seq) => {
                let idle = now.duration_since(seq.last_used) >= app.opts.idle_timeout;
                if idle {
                    seq.gone = true;
                }
                !idle
            }
        });
        let evicted = (before - table.len()) as u64;
        app.evicted.fetch_add(evicted, Ordering::Relaxed);
    }
}

/// The router of a server over `model` (for tests and embedding; [`serve`] binds and runs it).
fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(|| async { StatusCode::OK }))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/stats", get(model_stats))
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
        .route("/v2/models/{name}/generate", post(generate_text))
        .route("/v2/models/{name}/score", post(score))
        .fallback(not_found)
        .with_state(app)
}

/// Serves `model` until `shutdown` resolves, then finishes the requests in flight. `ready` is
/// called with the bound address once the server accepts connections.
pub fn serve(
    model: FamModel,
    tokenizer: Option<TextTokenizer>,
    eos: Vec<u32>,
    opts: ServeOptions,
    ready: impl FnOnce(SocketAddr),
    shutdown: Arc<tokio::sync::Notify>,
) -> Result<()> {
    if opts.max_sequences == 0 || opts.max_batch == 0 || opts.max_tokens == 0 {
        return Err(Error::Input(
            "--max-sequences, --max-batch-size and --max-tokens must be at least 1".into(),
        ));
    }
    let model = Arc::new(model);
    let stats = Arc::new(BatchStats::default());
    let workers = opts
        .batch_workers
        .unwrap_or_else(|| model.block_runners().limit());
    let (batcher, batch_threads) = Batcher::spawn(
        model.clone(),
        opts.max_batch,
        opts.batch_delay,
        stats.clone(),
        workers,
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("famc-http")
        .build()
        .map_err(|e| Error::Input(format!("cannot start the HTTP runtime: {e}")))?;
    let addr = opts.addr;
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Input(format!("cannot listen on {addr}: {e}")))?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::Input(format!("cannot read the bound address: {e}")))?;
        let app = Arc::new(App {
            model,
            tokenizer,
            eos,
            opts,
            sequences: Mutex::new(HashMap::new()),
            batcher,
            batch_workers: workers,
            stats,
            requests: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        });
        let evictor = tokio::spawn(evict_idle(app.clone()));
        ready(bound);
        let served = axum::serve(listener, router(app))
            .with_graceful_shutdown(async move { shutdown.notified().await })
            .await;
        evictor.abort();
        served.map_err(|e| Error::Input(format!("the server failed: {e}")))
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    // every Batcher handle is gone with the app: the threads end after their last batches
    for t in batch_threads {
        let _ = t.join();
    }
    result
}
