//! The KServe v2 inference protocol as Triton speaks it over HTTP: JSON requests and responses,
//! with Triton's binary tensor extension (`Inference-Header-Content-Length`), which
//! `tritonclient.http` uses by default.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ndarray::Array2;
use serde::Deserialize;
use serde_json::{json, Map, Value as Json};

/// The header giving the length of the JSON part of a body that carries binary tensors.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The graph input a request sends and the output it gets back.
pub const INPUT_IDS: &str = "input_ids";
pub const LOGITS: &str = "logits";

/// A request refused (4xx) or failed (5xx): answered as `{"error": message}`, as Triton does.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

/// An inference request's JSON part.
#[derive(Debug, Deserialize)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<Json>,
    #[serde(default)]
    pub parameters: Map<String, Json>,
    #[serde(default)]
    pub inputs: Vec<InputTensor>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
pub struct InputTensor {
    pub name: String,
    #[serde(default)]
    pub shape: Vec<i64>,
    #[serde(default)]
    pub datatype: String,
    #[serde(default)]
    pub parameters: Map<String, Json>,
    #[serde(default)]
    pub data: Option<Json>,
}

#[derive(Debug, Deserialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Map<String, Json>,
}

/// A sequence's id: Triton's correlation id, an unsigned integer or a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SequenceId {
    Number(u64),
    Text(String),
}

impl SequenceId {
    pub fn to_json(&self) -> Json {
        match self {
            SequenceId::Number(n) => json!(n),
            SequenceId::Text(s) => json!(s),
        }
    }
}

impl std::fmt::Display for SequenceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SequenceId::Number(n) => write!(f, "{n}"),
            SequenceId::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// What a request asks of its sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceControl {
    /// `None`: no sequence (0 or absent), a one-off request that starts and ends its own.
    pub id: Option<SequenceId>,
    pub start: bool,
    pub end: bool,
}

/// A parsed infer request: the token ids, the sequence flags and how to send the logits.
#[derive(Debug)]
pub struct Infer {
    pub id: Option<Json>,
    pub ids: Vec<u32>,
    pub sequence: SequenceControl,
    pub binary_output: bool,
}

fn flag(params: &Map<String, Json>, key: &str) -> Result<bool, ApiError> {
    match params.get(key) {
        None | Some(Json::Null) => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::bad(format!(
            "parameter `{key}` must be true or false, got {other}"
        ))),
    }
}

fn sequence_control(params: &Map<String, Json>) -> Result<SequenceControl, ApiError> {
    let id = match params.get("sequence_id") {
        None | Some(Json::Null) => None,
        Some(Json::Number(n)) => match n.as_u64() {
            Some(0) => None,
            Some(n) => Some(SequenceId::Number(n)),
            None => {
                return Err(ApiError::bad(format!(
                    "parameter `sequence_id` must be an unsigned integer or a string, got {n}"
                )))
            }
        },
        Some(Json::String(s)) if s.is_empty() => None,
        Some(Json::String(s)) => Some(SequenceId::Text(s.clone())),
        Some(other) => {
            return Err(ApiError::bad(format!(
                "parameter `sequence_id` must be an unsigned integer or a string, got {other}"
            )))
        }
    };
    Ok(SequenceControl {
        id,
        start: flag(params, "sequence_start")?,
        end: flag(params, "sequence_end")?,
    })
}

/// Splits a body into its JSON part and the binary tensors after it.
fn split_body<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), ApiError> {
    match headers.get(HEADER_LENGTH) {
        None => Ok((body, &[])),
        Some(v) => {
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    ApiError::bad(format!(
                        "header {HEADER_LENGTH} must be a byte count, got {v:?}"
                    ))
                })?;
            if n > body.len() {
                return Err(ApiError::bad(format!(
                    "header {HEADER_LENGTH} says the JSON part has {n} bytes; the body has {}",
                    body.len()
                )));
            }
            Ok(body.split_at(n))
        }
    }
}

fn collect_ints(v: &Json, out: &mut Vec<i128>) -> Result<(), ApiError> {
    match v {
        Json::Array(items) => items.iter().try_for_each(|i| collect_ints(i, out)),
        Json::Number(n) => match n.as_i64().map(i128::from).or(n.as_u64().map(i128::from)) {
            Some(i) => {
                out.push(i);
                Ok(())
            }
            None => Err(ApiError::bad(format!(
                "input `{INPUT_IDS}`: {n} is not an integer token id"
            ))),
        },
        other => Err(ApiError::bad(format!(
            "input `{INPUT_IDS}`: {other} is not an integer token id"
        ))),
    }
}

/// Parses an infer request for a model of `vocab` tokens, taking at most `max_tokens` ids.
pub fn parse_infer(
    headers: &HeaderMap,
    body: &[u8],
    vocab: usize,
    max_tokens: usize,
) -> Result<Infer, ApiError> {
    let (head, mut binary) = split_body(headers, body)?;
    let req: InferRequest = serde_json::from_slice(head)
        .map_err(|e| ApiError::bad(format!("the request is not a KServe v2 infer request: {e}")))?;
    if let Some(other) = req.inputs.iter().find(|i| i.name != INPUT_IDS) {
        return Err(ApiError::bad(format!(
            "unknown input `{}`: the model takes one input, `{INPUT_IDS}`",
            other.name
        )));
    }
    let input = match req.inputs.as_slice() {
        [one] => one,
        [] => {
            return Err(ApiError::bad(format!(
                "the request has no input `{INPUT_IDS}`"
            )))
        }
        _ => {
            return Err(ApiError::bad(format!(
                "input `{INPUT_IDS}` is given more than once"
            )))
        }
    };
    let n = match input.shape.as_slice() {
        [n] | [1, n] if *n >= 1 => *n as usize,
        _ => {
            return Err(ApiError::bad(format!(
                "input `{INPUT_IDS}` has shape {:?}; it takes [1, N] (one sequence, N ≥ 1 tokens) or [N]",
                input.shape
            )))
        }
    };
    if n > max_tokens {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("input `{INPUT_IDS}` holds {n} tokens; this server takes at most {max_tokens} per request (--max-tokens)"),
        ));
    }
    let width = match input.datatype.as_str() {
        "INT64" | "UINT64" => 8,
        "INT32" | "UINT32" => 4,
        other => {
            return Err(ApiError::bad(format!(
                "input `{INPUT_IDS}` has datatype {other:?}; it takes INT64 or INT32"
            )))
        }
    };
    let signed = input.datatype.starts_with("INT");
    let raw: Vec<i128> = match input.parameters.get("binary_data_size") {
        Some(size) => {
            let size = size.as_u64().ok_or_else(|| {
                ApiError::bad(format!(
                    "input `{INPUT_IDS}`: binary_data_size must be a byte count"
                ))
            })? as usize;
            if size != n * width || size > binary.len() {
                return Err(ApiError::bad(format!(
                    "input `{INPUT_IDS}`: binary_data_size {size} does not hold {n} {} values ({} bytes; {} binary bytes sent)",
                    input.datatype,
                    n * width,
                    binary.len()
                )));
            }
            let (bytes, rest) = binary.split_at(size);
            binary = rest;
            bytes
                .chunks_exact(width)
                .map(|c| match (width, signed) {
                    (8, true) => i64::from_le_bytes(c.try_into().expect("8")) as i128,
                    (8, false) => u64::from_le_bytes(c.try_into().expect("8")) as i128,
                    (_, true) => i32::from_le_bytes(c.try_into().expect("4")) as i128,
                    _ => u32::from_le_bytes(c.try_into().expect("4")) as i128,
                })
                .collect()
        }
        None => {
            let data = input.data.as_ref().ok_or_else(|| {
                ApiError::bad(format!(
                    "input `{INPUT_IDS}` has neither `data` nor binary data"
                ))
            })?;
            let mut out = Vec::with_capacity(n);
            collect_ints(data, &mut out)?;
            if out.len() != n {
                return Err(ApiError::bad(format!(
                    "input `{INPUT_IDS}` has shape {:?} but {} values",
                    input.shape,
                    out.len()
                )));
            }
            out
        }
    };
    if !binary.is_empty() {
        return Err(ApiError::bad(format!(
            "{} binary bytes after the tensors the JSON part describes",
            binary.len()
        )));
    }
    let ids = raw
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if id < 0 || id >= vocab as i128 {
                Err(ApiError::bad(format!(
                    "input `{INPUT_IDS}`: token id {id} at offset {i} is out of range (vocab_size {vocab})"
                )))
            } else {
                Ok(id as u32)
            }
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let mut binary_output = flag(&req.parameters, "binary_data_output")?;
    if let Some(outputs) = &req.outputs {
        for o in outputs {
            if o.name != LOGITS {
                return Err(ApiError::bad(format!(
                    "unknown output `{}`: the model gives one output, `{LOGITS}`",
                    o.name
                )));
            }
            binary_output |= flag(&o.parameters, "binary_data")?;
        }
    }
    Ok(Infer {
        id: req.id,
        ids,
        sequence: sequence_control(&req.parameters)?,
        binary_output,
    })
}

#[derive(serde::Serialize)]
struct OutputTensor<'a> {
    name: &'a str,
    datatype: &'a str,
    shape: [usize; 3],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Json>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a [f32]>,
}

#[derive(serde::Serialize)]
struct InferResponse<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<Json>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Json>,
    outputs: [OutputTensor<'a>; 1],
}

/// The response to an infer request: logits [1, N, V] as JSON numbers or as binary data.
pub fn infer_response(
    model: &str,
    req_id: Option<Json>,
    sequence: Option<&SequenceId>,
    logits: &Array2<f32>,
    binary: bool,
) -> Response {
    let (n, v) = logits.dim();
    let logits = logits.as_standard_layout();
    let values = logits.as_slice().expect("standard layout");
    let head = |parameters, data| InferResponse {
        model_name: model,
        model_version: "1",
        id: req_id.clone(),
        parameters: sequence.map(|s| json!({ "sequence_id": s.to_json() })),
        outputs: [OutputTensor {
            name: LOGITS,
            datatype: "FP32",
            shape: [1, n, v],
            parameters,
            data,
        }],
    };
    if binary {
        let size = values.len() * 4;
        let mut body = serde_json::to_vec(&head(Some(json!({ "binary_data_size": size })), None))
            .expect("serialises");
        let json_len = body.len();
        body.reserve(size);
        for x in values {
            body.extend_from_slice(&x.to_le_bytes());
        }
        let mut resp = (StatusCode::OK, body).into_response();
        let h = resp.headers_mut();
        h.insert(HEADER_LENGTH, HeaderValue::from(json_len));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        resp
    } else {
        let body = serde_json::to_vec(&head(None, Some(values))).expect("serialises");
        let mut resp = (StatusCode::OK, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}
