//! A minimal client of PostgreSQL's streaming replication protocol: connect in
//! `replication=database` mode, authenticate (trust, password, MD5, SCRAM-SHA-256), start a
//! logical stream from a slot, read its messages and report the confirmed position.
//!
//! sqlx cannot speak the copy-both sub-protocol a replication stream uses, so this module
//! frames the few messages it needs itself; authentication and the frontend encodings come
//! from `postgres-protocol`. Reading is cancel-safe (bytes read stay in the buffer), so the
//! stream can be awaited in a `select!` beside a timer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::lsn::Lsn;

/// What went wrong on a replication connection.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or broke: the database is (for now) unreachable.
    #[error("replication connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server refused what was asked, with its SQLSTATE.
    #[error("PostgreSQL refused ({code}): {message}")]
    Server { code: String, message: String },
    /// The URL cannot be used for a replication connection.
    #[error("{0}")]
    Config(String),
    /// The server sent something this client does not understand.
    #[error("replication protocol: {0}")]
    Protocol(String),
}

impl WireError {
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Where and as whom to connect, read from a `postgres://` URL.
#[derive(Clone, Debug)]
pub struct ConnectTarget {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    database: String,
}

impl ConnectTarget {
    /// Reads `postgres://user:password@host:port/database[?sslmode=...]`. TLS is not spoken
    /// here: `sslmode=require` (or stricter) is refused rather than silently downgraded.
    pub fn parse(url: &str) -> Result<Self, WireError> {
        let parsed = url::Url::parse(url)
            .map_err(|e| WireError::Config(format!("database URL is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(WireError::Config(format!(
                "database URL scheme {:?}: the stream relay needs postgres://",
                parsed.scheme()
            )));
        }
        let mut host = parsed.host_str().unwrap_or_default().to_owned();
        for (k, v) in parsed.query_pairs() {
            match (&*k, &*v) {
                ("sslmode", "require" | "verify-ca" | "verify-full") => {
                    return Err(WireError::Config(format!(
                        "sslmode={v}: the stream relay's replication connection speaks plain \
                         TCP only; run it where the database is reachable without TLS (a \
                         sidecar or a private network) or use the table write mode"
                    )))
                }
                ("host", h) => host = h.to_owned(),
                _ => {}
            }
        }
        if host.is_empty() || host.starts_with('/') {
            return Err(WireError::Config(
                "the stream relay connects over TCP: give a host name in the database URL".into(),
            ));
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| {
                    WireError::Config("database URL: user or password is not UTF-8".into())
                })
        };
        let user = if parsed.username().is_empty() {
            "postgres".to_owned()
        } else {
            decode(parsed.username())?
        };
        let database = match parsed.path().trim_start_matches('/') {
            "" => user.clone(),
            d => decode(d)?,
        };
        Ok(Self {
            host,
            port: parsed.port().unwrap_or(5432),
            password: parsed.password().map(decode).transpose()?,
            user,
            database,
        })
    }
}

/// One message of a logical replication stream.
#[derive(Debug)]
pub enum Replicated {
    /// WAL data: `start` is the record's position, `sent_at` the server's clock at sending.
    Data {
        start: Lsn,
        sent_at: SystemTime,
        data: Bytes,
    },
    /// The server's keepalive: it has sent everything before `wal_end`.
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// A replication connection (plain TCP).
pub struct ReplicationConnection {
    socket: TcpStream,
    read: BytesMut,
    write: BytesMut,
}

impl ReplicationConnection {
    /// Connects, authenticates and waits until the server is ready for commands.
    pub async fn connect(
        target: &ConnectTarget,
        application_name: &str,
        timeout: Duration,
    ) -> Result<Self, WireError> {
        let socket = tokio::time::timeout(
            timeout,
            TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no connection to {}:{} within {timeout:?}",
                    target.host, target.port
                ),
            )
        })??;
        socket.set_nodelay(true)?;
        let mut conn = Self {
            socket,
            read: BytesMut::with_capacity(64 * 1024),
            write: BytesMut::with_capacity(1024),
        };
        tokio::time::timeout(timeout, conn.startup(target, application_name))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("PostgreSQL did not complete the start-up within {timeout:?}"),
                )
            })??;
        Ok(conn)
    }

    async fn startup(&mut self, target: &ConnectTarget, app: &str) -> Result<(), WireError> {
        let params = [
            ("user", target.user.as_str()),
            ("database", target.database.as_str()),
            ("replication", "database"),
            ("application_name", app),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.write)?;
        self.flush().await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, mut body) = self.message().await?;
            match tag {
                b'R' => {
                    let code = body.get_i32();
                    let password = || {
                        target.password.as_deref().ok_or_else(|| {
                            WireError::Config(
                                "PostgreSQL asks for a password: put it in the database URL".into(),
                            )
                        })
                    };
                    match code {
                        0 => {}
                        3 => {
                            frontend::password_message(password()?.as_bytes(), &mut self.write)?;
                            self.flush().await?;
                        }
                        5 => {
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = postgres_protocol::authentication::md5_hash(
                                target.user.as_bytes(),
                                password()?.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut self.write)?;
                            self.flush().await?;
                        }
                        10 => {
                            let offered = body
                                .split(|b| *b == 0)
                                .any(|m| m == SCRAM_SHA_256.as_bytes());
                            if !offered {
                                return Err(WireError::Config(
                                    "PostgreSQL offers no SASL mechanism this relay knows (it speaks SCRAM-SHA-256)".into(),
                                ));
                            }
                            let s = ScramSha256::new(
                                password()?.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                SCRAM_SHA_256,
                                s.message(),
                                &mut self.write,
                            )?;
                            self.flush().await?;
                            scram = Some(s);
                        }
                        11 | 12 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                WireError::Protocol("SASL message before SASL started".into())
                            })?;
                            if code == 11 {
                                s.update(&body)?;
                                frontend::sasl_response(s.message(), &mut self.write)?;
                                self.flush().await?;
                            } else {
                                s.finish(&body)?;
                            }
                        }
                        other => {
                            return Err(WireError::Config(format!(
                                "PostgreSQL asks for authentication method {other}, which the \
                                 stream relay does not speak (trust, password, md5 and \
                                 scram-sha-256 work)"
                            )))
                        }
                    }
                }
                b'E' => return Err(server_error(&body)),
                b'Z' => return Ok(()),
                // ParameterStatus, BackendKeyData, NoticeResponse
                _ => {}
            }
        }
    }

    /// Starts streaming `slot` with pgoutput, logical messages on, from the slot's confirmed
    /// position. `slot` and `publication` are validated identifiers.
    pub async fn start_logical(&mut self, slot: &str, publication: &str) -> Result<(), WireError> {
        let command = format!(
            "START_REPLICATION SLOT \"{slot}\" LOGICAL 0/0 (proto_version '1', \
             publication_names '\"{publication}\"', messages 'true')"
        );
        frontend::query(&command, &mut self.write)?;
        self.flush().await?;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'W' => return Ok(()),
                b'E' => {
                    let e = server_error(&body);
                    // The server still sends ReadyForQuery; the caller drops the connection.
                    return Err(e);
                }
                _ => {}
            }
        }
    }

    /// The next message of the stream. Cancel-safe.
    pub async fn next(&mut self) -> Result<Replicated, WireError> {
        loop {
            let (tag, mut body) = self.message().await?;
            match tag {
                b'd' => {
                    if body.is_empty() {
                        continue;
                    }
                    match body.get_u8() {
                        b'w' => {
                            need(&body, 24, "XLogData")?;
                            let start = Lsn(body.get_u64());
                            let _wal_end = body.get_u64();
                            let sent_at = pg_time(body.get_i64());
                            return Ok(Replicated::Data {
                                start,
                                sent_at,
                                data: body,
                            });
                        }
                        b'k' => {
                            need(&body, 17, "keepalive")?;
                            let wal_end = Lsn(body.get_u64());
                            let _clock = body.get_i64();
                            let reply_requested = body.get_u8() == 1;
                            return Ok(Replicated::Keepalive {
                                wal_end,
                                reply_requested,
                            });
                        }
                        other => {
                            return Err(WireError::Protocol(format!(
                                "unknown replication message {:?}",
                                other as char
                            )))
                        }
                    }
                }
                b'E' => return Err(server_error(&body)),
                b'c' => {
                    return Err(WireError::Io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the server ended the replication stream",
                    )))
                }
                _ => {}
            }
        }
    }

    /// Reports `flushed` as written, flushed and applied: the server may free WAL before it
    /// and will start the next stream there.
    pub async fn send_status(&mut self, flushed: Lsn, reply: bool) -> Result<(), WireError> {
        let mut m = BytesMut::with_capacity(34);
        m.put_u8(b'r');
        m.put_u64(flushed.0);
        m.put_u64(flushed.0);
        m.put_u64(flushed.0);
        m.put_i64(pg_now());
        m.put_u8(u8::from(reply));
        frontend::CopyData::new(m.freeze())?.write(&mut self.write);
        self.flush().await
    }

    /// Ends the session politely (the server frees the slot at once).
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
    }

    async fn flush(&mut self) -> Result<(), WireError> {
        self.socket.write_all(&self.write).await?;
        self.write.clear();
        Ok(())
    }

    /// One backend message: its tag and body.
    async fn message(&mut self) -> Result<(u8, Bytes), WireError> {
        loop {
            if self.read.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]])
                        as usize;
                if len < 4 {
                    return Err(WireError::Protocol(format!("message length {len}")));
                }
                if self.read.len() > len {
                    let mut frame = self.read.split_to(len + 1);
                    let tag = frame[0];
                    frame.advance(5);
                    return Ok((tag, frame.freeze()));
                }
                self.read.reserve(len + 1 - self.read.len());
            }
            if self.socket.read_buf(&mut self.read).await? == 0 {
                return Err(WireError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "PostgreSQL closed the replication connection",
                )));
            }
        }
    }
}

fn need(body: &Bytes, n: usize, what: &str) -> Result<(), WireError> {
    if body.len() < n {
        return Err(WireError::Protocol(format!(
            "{what} of {} bytes",
            body.len()
        )));
    }
    Ok(())
}

/// The fields of an ErrorResponse: severity, SQLSTATE, message.
fn server_error(body: &[u8]) -> WireError {
    let (mut code, mut message) = (String::new(), String::new());
    for field in body.split(|b| *b == 0) {
        if let Some((&kind, text)) = field.split_first() {
            let text = String::from_utf8_lossy(text).into_owned();
            match kind {
                b'C' => code = text,
                b'M' => message = text,
                _ => {}
            }
        }
    }
    WireError::Server { code, message }
}

/// PostgreSQL's epoch (2000-01-01) in Unix seconds.
const PG_EPOCH: u64 = 946_684_800;

/// A server timestamp (microseconds since 2000-01-01) as a `SystemTime`.
pub fn pg_time(micros: i64) -> SystemTime {
    let base = UNIX_EPOCH + Duration::from_secs(PG_EPOCH);
    if micros >= 0 {
        base + Duration::from_micros(micros as u64)
    } else {
        base - Duration::from_micros(micros.unsigned_abs())
    }
}

fn pg_now() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH + Duration::from_secs(PG_EPOCH))
        .unwrap_or_default();
    since.as_micros() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_host_user_database_and_refuse_tls_requirements() {
        let t = ConnectTarget::parse("postgres://app:s%40cret@db.example:6543/orders").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.user.as_str(),
                t.database.as_str()
            ),
            ("db.example", 6543, "app", "orders")
        );
        assert_eq!(t.password.as_deref(), Some("s@cret"));
        let t = ConnectTarget::parse("postgres://127.0.0.1").unwrap();
        assert_eq!(
            (t.user.as_str(), t.database.as_str(), t.port),
            ("postgres", "postgres", 5432)
        );
        let e = ConnectTarget::parse("postgres://h/db?sslmode=require").unwrap_err();
        assert!(e.to_string().contains("plain TCP"), "{e}");
        let e = ConnectTarget::parse("postgres:///db?host=/var/run/postgresql").unwrap_err();
        assert!(e.to_string().contains("host name"), "{e}");
        assert!(ConnectTarget::parse("mysql://h/db").is_err());
    }

    #[test]
    fn server_times_count_from_2000() {
        let t = pg_time(1_000_000);
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_secs(PG_EPOCH + 1)
        );
    }
}
