//! Reading a JSON request body: the content type first, then the size (bounded, drained so
//! that a client still sending gets its 413), then the shape. Handlers take a
//! [`JsonBody<T>`] argument; its rejection is an [`ApiError`].

use super::observe::BODY_TIMEOUT;
use super::{ApiError, BodyTimeout};
use axum::body::Body;
use axum::extract::{FromRef, FromRequest, Request};
use axum::http::{header, HeaderMap};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;

/// A type a request body decodes into, and what a client whose body does not fit it is told.
pub trait RequestBody: DeserializeOwned {
    /// The 400's `err_msg`.
    const INVALID: &'static str;

    /// Decodes a whole body as [`JsonBody`] does once it has read it (see [`decode_json`]).
    /// The fuzz target of request bodies (`fuzz/fuzz_targets/request.rs`) calls this.
    fn decode(bytes: &[u8]) -> Result<Self, ApiError> {
        decode_json(bytes, Self::INVALID)
    }
}

/// The largest request body a router's routes accept, in bytes: a [`JsonBody`] finds it in
/// the router's state (through `FromRef`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimit(pub usize);

/// Extracts a `T` from a JSON request body as [`read_json`] reads it, at most the state's
/// [`BodyLimit`] long.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: RequestBody,
    S: Send + Sync,
    BodyLimit: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let BodyLimit(limit) = BodyLimit::from_ref(state);
        read_json(request, limit, T::INVALID).await.map(JsonBody)
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    // Visible ASCII only, as `to_str` checks (it copies nothing).
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    // Compared case-insensitively in place: no lower-cased copy per request.
    let essence = value
        .as_bytes()
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let starts = |prefix: &[u8]| {
        essence
            .get(..prefix.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
    };
    let ends = |suffix: &[u8]| {
        essence
            .len()
            .checked_sub(suffix.len())
            .is_some_and(|at| essence[at..].eq_ignore_ascii_case(suffix))
    };
    essence.eq_ignore_ascii_case(b"application/json") || (starts(b"application/") && ends(b"+json"))
}

/// How much of an oversized body is read and thrown away so that the client, still
/// sending, gets the 413 instead of a reset connection. How long that may take is bounded by
/// the body timeout ([`BodyTimeout`]).
pub const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// How much of a body left unread by its handler is still read, by a task of its own, so
/// that the stream ends as the client sent it ([`FinishOnDrop`]).
pub const FINISH_LIMIT: usize = 1024 * 1024;

/// A request body that, dropped before its end (a request answered without reading it:
/// 401, 404, 405, 415, 429), is read to its end by a task of its own, up to
/// [`FINISH_LIMIT`] bytes and until the request's body deadline (its head's arrival plus
/// the body timeout: a body already late is not waited for again), instead of being
/// dropped with the request.
///
/// Dropped unread, an HTTP/2 stream is reset (`RST_STREAM`) beside its answer, and some
/// clients (curl 7.88, Debian 12's) then report a framing error instead of the status. Read
/// to its end, the stream ends as the client sent it. A body read to its end by its
/// handler, and a request without a body (every GET), cost nothing more. Not for an
/// HTTP/1.1 request that expects `100 Continue`: its client waits for that before it sends
/// the body, so hyper's own handling (no `100 Continue`, the connection closed after the
/// answer) stays (see `Fronted::call`).
pub struct FinishOnDrop<B: http_body::Body<Data = axum::body::Bytes> + Unpin + Send + 'static> {
    body: Option<B>,
    deadline: tokio::time::Instant,
}

impl<B: http_body::Body<Data = axum::body::Bytes> + Unpin + Send + 'static> FinishOnDrop<B> {
    /// `body`, read to its end if dropped before, until `deadline`.
    pub fn new(body: B, deadline: tokio::time::Instant) -> Self {
        FinishOnDrop {
            body: Some(body),
            deadline,
        }
    }
}

impl<B: http_body::Body<Data = axum::body::Bytes> + Unpin + Send + 'static> http_body::Body
    for FinishOnDrop<B>
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let frame = std::pin::Pin::new(body).poll_frame(cx);
        if let std::task::Poll::Ready(None) = frame {
            // Read to its end: nothing left to finish (a chunked HTTP/1.1 body never says
            // so through `is_end_stream`).
            this.body = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(B::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), B::size_hint)
    }
}

impl<B: http_body::Body<Data = axum::body::Bytes> + Unpin + Send + 'static> Drop
    for FinishOnDrop<B>
{
    fn drop(&mut self) {
        let Some(mut body) = self.body.take() else {
            return;
        };
        if body.is_end_stream() || tokio::time::Instant::now() >= self.deadline {
            // At its end, or already late (a 408): nothing to finish.
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let deadline = self.deadline;
        runtime.spawn(async move {
            let _ = tokio::time::timeout_at(deadline, async {
                let mut seen = 0usize;
                while let Some(Ok(frame)) = body.frame().await {
                    if let Some(data) = frame.data_ref() {
                        seen = seen.saturating_add(data.len());
                        if seen > FINISH_LIMIT {
                            break;
                        }
                    }
                }
            })
            .await;
        });
    }
}

/// Reads a JSON body of at most `limit` bytes.
///
/// 415 unless the content type is JSON; 413 over the limit (after draining up to
/// [`DRAIN_LIMIT`] bytes, or at once when the client waits for `100 Continue`); 400 when the
/// body is not a JSON object that deserializes into `T`.
pub async fn read_json<T: DeserializeOwned>(
    request: Request,
    limit: usize,
    bad_body: &'static str,
) -> Result<T, ApiError> {
    let (parts, body) = request.into_parts();
    if !is_json(&parts.headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if declared.is_some_and(|n| n > limit as u64) && expects_continue {
        // The client has not sent the body yet and will not once it sees the answer.
        return Err(ApiError::PayloadTooLarge {
            limit,
            drained: true,
        });
    }
    // The whole body within the server's body timeout (from now, just after the head).
    let timeout = parts
        .extensions
        .get::<BodyTimeout>()
        .map_or(BODY_TIMEOUT, |t| t.0);
    let mut seen = 0;
    let collected = tokio::time::timeout(timeout, collect_bounded(body, limit, &mut seen)).await;
    let bytes = match collected {
        Ok(bytes) => bytes?,
        // Still coming, but already over the limit: that is the answer, not the lateness.
        Err(_) if seen > limit => {
            return Err(ApiError::PayloadTooLarge {
                limit,
                drained: false,
            })
        }
        Err(_) => return Err(ApiError::BodyTimeout),
    };
    decode_json(&bytes, bad_body)
}

/// Decodes a whole JSON body into `T`: 400 (`bad_body`) unless it is one JSON object that
/// deserializes into `T` with nothing after it.
///
/// Only a JSON object is a request body (serde would also read a struct from an array). It
/// is decoded straight into `T`, with no tree in between, so a field given twice is refused
/// instead of the last one silently winning.
pub fn decode_json<T: DeserializeOwned>(
    bytes: &[u8],
    bad_body: &'static str,
) -> Result<T, ApiError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::BadRequest(bad_body));
    }
    serde_json::from_slice(bytes).map_err(|_| ApiError::BadRequest(bad_body))
}

/// Reads `body` whole if it is at most `limit` bytes, else drains it (up to
/// [`DRAIN_LIMIT`]) and refuses it; `seen` counts the bytes received so far, for a caller
/// that stops waiting.
async fn collect_bounded(body: Body, limit: usize, seen: &mut usize) -> Result<Vec<u8>, ApiError> {
    let mut body = body;
    let mut buf = Vec::new();
    loop {
        let frame = body.frame().await;
        match frame {
            None => break,
            Some(Err(_)) if *seen > limit => {
                return Err(ApiError::PayloadTooLarge {
                    limit,
                    drained: false,
                })
            }
            Some(Err(_)) => return Err(ApiError::BadRequest("Request body could not be read")),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                *seen = seen.saturating_add(data.len());
                if *seen <= limit {
                    buf.extend_from_slice(&data);
                } else if *seen > DRAIN_LIMIT {
                    return Err(ApiError::PayloadTooLarge {
                        limit,
                        drained: false,
                    });
                }
            }
        }
    }
    if *seen > limit {
        return Err(ApiError::PayloadTooLarge {
            limit,
            drained: true,
        });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde::Deserialize;
    use std::time::Duration;

    #[derive(Deserialize, Debug, PartialEq)]
    struct Body1 {
        message: String,
    }

    /// A request body whose chunks a test sends one at a time: a send waits until the
    /// body has taken the chunk before (capacity 1), and fails once the body is dropped.
    struct Sent(tokio::sync::mpsc::Receiver<axum::body::Bytes>);

    impl http_body::Body for Sent {
        type Data = axum::body::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
        }
    }

    fn sent(
        deadline: tokio::time::Instant,
    ) -> (
        tokio::sync::mpsc::Sender<axum::body::Bytes>,
        FinishOnDrop<Sent>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        (tx, FinishOnDrop::new(Sent(rx), deadline))
    }

    /// Sends 64 KiB chunks until the body is gone; how many bytes it took.
    async fn send_until_dropped(tx: &tokio::sync::mpsc::Sender<axum::body::Bytes>) -> usize {
        let chunk = axum::body::Bytes::from(vec![b'x'; 64 * 1024]);
        let mut taken = 0;
        while tokio::time::timeout(Duration::from_secs(10), tx.send(chunk.clone()))
            .await
            .expect("the body takes a chunk or is dropped")
            .is_ok()
        {
            taken += chunk.len();
            assert!(taken <= 4 * FINISH_LIMIT, "never dropped");
        }
        taken
    }

    #[tokio::test]
    async fn a_body_dropped_unread_is_read_to_its_end_by_a_task_of_its_own() {
        let in_a_minute = tokio::time::Instant::now() + Duration::from_secs(60);
        let (tx, body) = sent(in_a_minute);
        drop(body);
        for _ in 0..4 {
            tx.send(axum::body::Bytes::from_static(b"rest"))
                .await
                .expect("the body is still read after its drop");
        }
        drop(tx);

        // Not past `FINISH_LIMIT`: then it is dropped (what was taken, within a chunk and
        // the channel's one).
        let (tx, body) = sent(in_a_minute);
        drop(body);
        let taken = send_until_dropped(&tx).await;
        assert!(
            (FINISH_LIMIT..=FINISH_LIMIT + 2 * 64 * 1024).contains(&taken),
            "{taken} bytes"
        );

        // Past its deadline (a body already late): dropped at once.
        let (tx, body) = sent(tokio::time::Instant::now());
        drop(body);
        assert!(send_until_dropped(&tx).await <= 64 * 1024);
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_leaves_nothing_to_finish() {
        let (tx, mut body) = sent(tokio::time::Instant::now() + Duration::from_secs(60));
        tx.send(axum::body::Bytes::from_static(b"all"))
            .await
            .expect("send");
        drop(tx);
        assert!(body.frame().await.is_some());
        assert!(body.frame().await.is_none());
        assert!(
            http_body::Body::is_end_stream(&body),
            "a body read to its end is at its end"
        );
        drop(body);
    }

    #[test]
    fn a_body_dropped_outside_a_runtime_is_dropped() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (tx, body) =
            runtime.block_on(async { sent(tokio::time::Instant::now() + Duration::from_secs(60)) });
        drop(body);
        assert!(tx.is_closed(), "no runtime to read it: dropped, no panic");
    }

    fn request(content_type: Option<&str>, body: Body) -> Request {
        let mut b = axum::http::Request::post("/messages");
        if let Some(ct) = content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        b.body(body).expect("request")
    }

    async fn read(r: Request, limit: usize) -> Result<Body1, ApiError> {
        tokio::time::timeout(Duration::from_secs(5), read_json(r, limit, "bad body"))
            .await
            .expect("never hangs")
    }

    #[test]
    fn json_content_types_are_recognised_in_any_case_with_parameters() {
        let is = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_bytes(value).expect("header"),
            );
            is_json(&headers)
        };
        for json in [
            &b"application/json"[..],
            b"Application/JSON",
            b"application/json; charset=utf-8",
            b"  application/json  ;charset=utf-8",
            b"application/problem+json",
            b"APPLICATION/VND.API+JSON; q=1",
        ] {
            assert!(is(json), "{:?}", String::from_utf8_lossy(json));
        }
        for other in [
            &b"text/json-ish"[..],
            b"text/plain",
            b"application/jsonx",
            b"application/json-seq",
            b"application+json",
            b"json",
            b"",
            b"; application/json",
            b"application/x+jsonp",
            b"application/j\xe9son",
            b"application/json; charset=\xe9",
            b"application/\xe9+json",
        ] {
            assert!(!is(other), "{:?}", String::from_utf8_lossy(other));
        }
        assert!(!is_json(&HeaderMap::new()));
    }

    #[tokio::test]
    async fn json_bodies_are_checked_in_order_type_size_shape() {
        let ok = r#"{"message":"hi","extra":1}"#;
        assert_eq!(
            read(request(Some("application/json"), ok.into()), 100).await,
            Ok(Body1 {
                message: "hi".into()
            })
        );
        assert_eq!(
            read(request(Some("application/problem+json"), ok.into()), 100)
                .await
                .map(|b| b.message),
            Ok("hi".into())
        );
        assert_eq!(
            read(request(None, ok.into()), 100).await,
            Err(ApiError::UnsupportedMediaType)
        );
        assert_eq!(
            read(request(Some("text/json-ish"), ok.into()), 100).await,
            Err(ApiError::UnsupportedMediaType)
        );
        assert_eq!(
            read(request(Some("application/json"), ok.into()), 10).await,
            Err(ApiError::PayloadTooLarge {
                limit: 10,
                drained: true
            })
        );
        for bad in [
            r#"["hi"]"#,
            "\"hi\"",
            "{",
            r#"{"message":1}"#,
            "",
            r#"{"message":"a","message":"b"}"#,
            r#"{"message":"a"} trailing"#,
        ] {
            assert_eq!(
                read(request(Some("application/json"), bad.into()), 100).await,
                Err(ApiError::BadRequest("bad body")),
                "{bad}"
            );
        }
    }

    impl RequestBody for Body1 {
        const INVALID: &'static str = "bad body";
    }

    #[tokio::test]
    async fn decode_answers_what_the_extractor_answers_for_the_same_bytes() {
        for body in [
            r#"{"message":"hi","extra":1}"#,
            r#" {"message":"hi"}"#,
            r#"["hi"]"#,
            r#"{"message":"a","message":"b"}"#,
            r#"{"message":"a"} trailing"#,
            "",
        ] {
            assert_eq!(
                Body1::decode(body.as_bytes()),
                read(request(Some("application/json"), body.into()), 100).await,
                "{body}"
            );
        }
    }

    /// A body past the limit that is still coming when the body timeout ends is refused as
    /// too large (what it is), not as late; a body under the limit gets the timeout.
    #[tokio::test]
    async fn a_body_already_over_the_limit_at_its_timeout_is_413_and_one_under_it_408() {
        for (sent, expected) in [
            (
                2048,
                ApiError::PayloadTooLarge {
                    limit: 1024,
                    drained: false,
                },
            ),
            (512, ApiError::BodyTimeout),
        ] {
            use futures::StreamExt;
            let first = futures::stream::iter([Ok::<_, std::io::Error>(vec![b' '; sent])]);
            let trickle = Body::from_stream(first.chain(futures::stream::pending()));
            let mut r = request(Some("application/json"), trickle);
            r.extensions_mut()
                .insert(BodyTimeout(Duration::from_millis(100)));
            assert_eq!(read(r, 1024).await, Err(expected), "{sent} bytes sent");
        }
    }

    #[tokio::test]
    async fn an_oversized_body_behind_expect_continue_is_refused_without_reading_it() {
        // A body that never arrives: reading it would hang the test.
        let never =
            Body::from_stream(futures::stream::pending::<Result<Vec<u8>, std::io::Error>>());
        let mut r = request(Some("application/json"), never);
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(8 * 1024 * 1024));
        r.headers_mut()
            .insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        assert_eq!(
            read(r, 1024).await,
            Err(ApiError::PayloadTooLarge {
                limit: 1024,
                drained: true
            })
        );
    }
}
