//! The few pgoutput messages the stream relay reads (protocol version 1, logical messages
//! on): a transaction's begin and commit, and logical messages. Relation changes are not
//! asked for (the relay's publication holds no tables) and are skipped if they come.

use std::time::SystemTime;

use bytes::{Buf, Bytes};

use super::lsn::Lsn;
use super::wire::pg_time;

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Begin {
        commit_time: SystemTime,
    },
    /// A logical message; `transactional` ones arrive between their transaction's begin and
    /// commit, the others on their own.
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    Commit {
        /// The end of the commit record: where a stream resumes after this transaction.
        end: Lsn,
    },
    /// A message kind the relay has no use for.
    Other(u8),
}

/// Decodes one pgoutput message.
pub fn decode(mut data: Bytes) -> Result<Decoded, String> {
    let short = |what: &str| format!("pgoutput {what} message too short");
    if data.is_empty() {
        return Err(short("empty"));
    }
    match data.get_u8() {
        b'B' => {
            if data.len() < 20 {
                return Err(short("begin"));
            }
            let _final_lsn = data.get_u64();
            let commit_time = pg_time(data.get_i64());
            Ok(Decoded::Begin { commit_time })
        }
        b'C' => {
            if data.len() < 25 {
                return Err(short("commit"));
            }
            let _flags = data.get_u8();
            let _commit_lsn = data.get_u64();
            let end = Lsn(data.get_u64());
            Ok(Decoded::Commit { end })
        }
        b'M' => {
            if data.len() < 9 {
                return Err(short("logical"));
            }
            let transactional = data.get_u8() == 1;
            let lsn = Lsn(data.get_u64());
            let nul = data
                .iter()
                .position(|b| *b == 0)
                .ok_or_else(|| short("logical (prefix)"))?;
            let prefix = String::from_utf8_lossy(&data[..nul]).into_owned();
            data.advance(nul + 1);
            if data.len() < 4 {
                return Err(short("logical (length)"));
            }
            let len = data.get_u32() as usize;
            if data.len() != len {
                return Err(format!(
                    "pgoutput logical message says {len} bytes and carries {}",
                    data.len()
                ));
            }
            Ok(Decoded::Message {
                transactional,
                lsn,
                prefix,
                content: data,
            })
        }
        other => Ok(Decoded::Other(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn begin_message_and_commit_are_read_and_truncation_reported() {
        let mut m = bytes::BytesMut::new();
        m.put_u8(b'M');
        m.put_u8(1);
        m.put_u64(0x10);
        m.put_slice(b"outbox:public\0");
        m.put_u32(3);
        m.put_slice(b"abc");
        let m = m.freeze();
        assert_eq!(
            decode(m.clone()).unwrap(),
            Decoded::Message {
                transactional: true,
                lsn: Lsn(0x10),
                prefix: "outbox:public".into(),
                content: Bytes::from_static(b"abc"),
            }
        );
        assert!(decode(m.slice(..m.len() - 1)).is_err());
        let mut c = bytes::BytesMut::new();
        c.put_u8(b'C');
        c.put_u8(0);
        c.put_u64(1);
        c.put_u64(2);
        c.put_i64(0);
        assert_eq!(decode(c.freeze()).unwrap(), Decoded::Commit { end: Lsn(2) });
        assert_eq!(
            decode(Bytes::from_static(b"R")).unwrap(),
            Decoded::Other(b'R')
        );
    }
}
