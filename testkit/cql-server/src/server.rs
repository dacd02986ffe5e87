//! Accept loop and per-connection request handling.

use std::{
    io,
    net::SocketAddr,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use kassandra::{error::DbError, frame::response::error::Error};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{JoinHandle, JoinSet},
};

use crate::{
    db::Db,
    proto::{self, opcode, Header, Reader},
};

/// A running server. Dropping it (or calling [`Server::shutdown`]) stops
/// accepting connections and closes the open ones.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    /// The address the server listens on (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the server and waits until every connection is closed.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Starts a server on `addr` (e.g. `"127.0.0.1:0"`) inside the current tokio
/// runtime. Only loopback addresses are accepted: this is a test fixture.
pub async fn start(addr: &str) -> io::Result<Server> {
    let candidates: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await?
        .filter(|a| a.ip().is_loopback())
        .collect();
    if candidates.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cql-server only binds loopback addresses, got {addr}"),
        ));
    }
    let listener = TcpListener::bind(&candidates[..]).await?;
    let local_addr = listener.local_addr()?;
    let db = Arc::new(Mutex::new(Db::new(local_addr.ip(), local_addr.port())));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, db, stopped));
    Ok(Server {
        local_addr,
        stop,
        task: Some(task),
    })
}

async fn accept_loop(
    listener: TcpListener,
    db: Arc<Mutex<Db>>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // Only `true` is ever sent; an error means the Server was dropped.
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, db.clone()));
                }
                // e.g. too many open files: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

fn lock(db: &Mutex<Db>) -> MutexGuard<'_, Db> {
    // A panic while holding the lock is turned into an error frame; the
    // engine stays usable.
    db.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Per-connection state.
#[derive(Default)]
struct Conn {
    keyspace: Option<String>,
}

async fn connection(stream: TcpStream, db: Arc<Mutex<Db>>) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut wr = BufWriter::with_capacity(64 * 1024, wr);
    let mut conn = Conn::default();
    let mut out = Vec::new();
    loop {
        let mut raw = [0u8; proto::HEADER_LEN];
        if rd.read_exact(&mut raw).await.is_err() {
            break;
        }
        let header = Header::parse(&raw);
        // Framing errors: the byte stream cannot be trusted any more, so
        // answer with an error frame and close this connection only.
        let fatal = if header.version != proto::REQUEST_VERSION {
            Some(format!(
                "Invalid or unsupported protocol version ({}); supported versions are (4/v4)",
                header.version
            ))
        } else if header.length > proto::MAX_BODY_LEN {
            Some(format!(
                "request frame of {} bytes is too large",
                header.length
            ))
        } else {
            None
        };
        if let Some(msg) = fatal {
            out.clear();
            let body = proto::error_body(&proto::protocol_error(msg));
            proto::put_frame(&mut out, header.stream, opcode::ERROR, &body);
            let _ = wr.write_all(&out).await;
            let _ = wr.flush().await;
            break;
        }
        let mut body = Vec::new();
        match (&mut rd)
            .take(header.length as u64)
            .read_to_end(&mut body)
            .await
        {
            Ok(n) if n == header.length => {}
            _ => break,
        }
        let (op, response) = handle(&db, &mut conn, &header, &body);
        out.clear();
        proto::put_frame(&mut out, header.stream, op, &response);
        if wr.write_all(&out).await.is_err() {
            break;
        }
        // Coalesce responses while complete requests are already buffered.
        if !frame_buffered(rd.buffer()) && wr.flush().await.is_err() {
            break;
        }
    }
}

/// Whether `buf` starts with a complete request frame.
fn frame_buffered(buf: &[u8]) -> bool {
    match buf.get(..proto::HEADER_LEN) {
        Some(h) => {
            let len = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) as usize;
            buf.len() - proto::HEADER_LEN >= len
        }
        None => false,
    }
}

/// Runs one request; errors and panics become ERROR frames.
fn handle(db: &Mutex<Db>, conn: &mut Conn, header: &Header, body: &[u8]) -> (u8, Vec<u8>) {
    guarded(|| dispatch(db, conn, header, body))
}

/// Turns errors and panics of a request handler into ERROR frame bodies.
fn guarded(f: impl FnOnce() -> Result<(u8, Vec<u8>), Error>) -> (u8, Vec<u8>) {
    let result = catch_unwind(AssertUnwindSafe(f));
    match result {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => (opcode::ERROR, proto::error_body(&err)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            let err = Error::new(
                DbError::ServerError,
                format!("cql-server internal error: {msg}"),
            );
            (opcode::ERROR, proto::error_body(&err))
        }
    }
}

fn dispatch(
    db: &Mutex<Db>,
    conn: &mut Conn,
    header: &Header,
    body: &[u8],
) -> Result<(u8, Vec<u8>), Error> {
    if header.flags & proto::FLAG_COMPRESSION != 0 {
        return Err(proto::protocol_error("compression was not negotiated"));
    }
    let mut r = Reader::new(body);
    if header.flags & proto::FLAG_CUSTOM_PAYLOAD != 0 {
        r.skip_custom_payload()?;
    }
    let result = |outcome| Ok((opcode::RESULT, proto::result_body(outcome)));
    match header.opcode {
        opcode::STARTUP => {
            let options = r.string_map()?;
            if options
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("COMPRESSION") && !v.is_empty())
            {
                return Err(proto::protocol_error("compression is not supported"));
            }
            Ok((opcode::READY, Vec::new()))
        }
        opcode::OPTIONS => Ok((opcode::SUPPORTED, proto::supported_body())),
        opcode::REGISTER => {
            r.string_list()?;
            Ok((opcode::READY, Vec::new()))
        }
        opcode::QUERY => {
            let cql = r.long_string()?;
            let opts = r.query_options()?;
            result(lock(db).query(&mut conn.keyspace, cql, &opts)?)
        }
        opcode::PREPARE => {
            let cql = r.long_string()?;
            result(lock(db).prepare(conn.keyspace.as_deref(), cql)?)
        }
        opcode::EXECUTE => {
            let id = r.short_bytes()?;
            let opts = r.query_options()?;
            result(lock(db).execute(&mut conn.keyspace, id, &opts)?)
        }
        opcode::BATCH => {
            let items = r.batch()?;
            result(lock(db).batch(conn.keyspace.as_deref(), items)?)
        }
        opcode::AUTH_RESPONSE => Err(proto::protocol_error("authentication is not enabled")),
        other => Err(proto::protocol_error(format!(
            "unknown request opcode {other:#04x}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_server_error_frames() {
        let (op, body) = guarded(|| panic!("boom"));
        assert_eq!(op, opcode::ERROR);
        assert_eq!(&body[..4], &0i32.to_be_bytes()); // ServerError
        assert!(String::from_utf8_lossy(&body).contains("boom"));
    }

    #[test]
    fn a_poisoned_lock_is_recovered() {
        let db = Arc::new(Mutex::new(Db::new([127, 0, 0, 1].into(), 9042)));
        let poisoner = db.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock();
            panic!("poison the lock");
        })
        .join();
        assert!(db.is_poisoned());
        let header = Header {
            version: proto::REQUEST_VERSION,
            flags: 0,
            stream: 1,
            opcode: opcode::QUERY,
            length: 0,
        };
        let cql = "SELECT key FROM system.local";
        let mut body = (cql.len() as u32).to_be_bytes().to_vec();
        body.extend(cql.as_bytes());
        body.extend([0, 1, 0]);
        let (op, _) = handle(&db, &mut Conn::default(), &header, &body);
        assert_eq!(op, opcode::RESULT);
    }
}
