//! logd's PostgreSQL side: schema migrations (under an advisory lock, so several logds starting
//! together do not race), and batches written one transaction each: a binary COPY straight into
//! the table, or, when the batch holds a record already stored (a resend after a lost ack), one
//! INSERT of arrays that drops the duplicates (by record id).

use std::collections::HashSet;

use bytes::{BufMut, BytesMut};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Transaction};

use crate::proto::LogRecord;

/// Schema versions, applied in order; each runs once.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE records (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    ts timestamptz NOT NULL,
    received timestamptz NOT NULL DEFAULT now(),
    host text NOT NULL,
    source_ip inet NOT NULL,
    level smallint NOT NULL,
    target text NOT NULL,
    message text NOT NULL,
    fields jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX records_ts ON records (ts);
"#,
    r#"
CREATE TABLE replication (peer text PRIMARY KEY, last_seq bigint NOT NULL);
"#,
    // Ids are only ever compared for equality: byte order is enough, and much cheaper than the
    // database's locale for every insert into the unique index (rebuilds that index once).
    r#"
ALTER TABLE records ALTER COLUMN id TYPE text COLLATE "C";
"#,
];

/// The fast way in: fails (unique violation) if any record of the batch is there already.
const COPY: &str = "COPY records (id, ts, host, source_ip, level, target, message, fields) FROM STDIN (FORMAT binary)";
const COPY_TYPES: [Type; 8] = [
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::INET,
    Type::INT2,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
];

/// The way in that drops duplicates, reporting the ids that were new.
const INSERT: &str = r#"
INSERT INTO records (id, ts, host, source_ip, level, target, message, fields)
SELECT id, to_timestamp(ts / 1000.0), host, ip::inet, level, target, message, fields::jsonb
FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::int2[], $6::text[], $7::text[], $8::text[])
    AS t(id, ts, host, ip, level, target, message, fields)
ON CONFLICT (id) DO NOTHING
RETURNING id
"#;

pub use crate::db::{DbConfig, connect};

/// The advisory lock serialising migrations of logd's database.
const MIGRATION_LOCK: i64 = 727_274;

/// Applies the migrations not applied yet.
pub async fn migrate(c: &mut Client) -> Result<(), tokio_postgres::Error> {
    crate::db::migrate(c, MIGRATION_LOCK, MIGRATIONS).await
}

/// Makes a record storable whatever a client sent: PostgreSQL refuses NUL in text and jsonb
/// (U+FFFD stands in for it) and timestamps outside its range (clamped to years 0-9999, the
/// original kept in the field `ts_ms_sent`). Without this one such record would fail its batch
/// on every retry, and the writer would stop.
pub fn sanitize(r: &mut LogRecord) {
    fn text(s: &mut String) {
        if s.contains('\0') {
            *s = s.replace('\0', "\u{fffd}");
        }
    }
    fn value(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => text(s),
            serde_json::Value::Array(a) => a.iter_mut().for_each(value),
            serde_json::Value::Object(m) => object(m),
            _ => {}
        }
    }
    fn object(m: &mut serde_json::Map<String, serde_json::Value>) {
        if m.keys().any(|k| k.contains('\0')) {
            *m = std::mem::take(m)
                .into_iter()
                .map(|(k, v)| (k.replace('\0', "\u{fffd}"), v))
                .collect();
        }
        m.values_mut().for_each(value);
    }
    for s in [&mut r.id, &mut r.host, &mut r.target, &mut r.message] {
        text(s);
    }
    object(&mut r.fields);
    const MIN_MS: i64 = -62_167_219_200_000; // 0000-01-01
    const MAX_MS: i64 = 253_402_300_799_999; // 9999-12-31
    if !(MIN_MS..=MAX_MS).contains(&r.ts_ms) {
        r.fields.insert("ts_ms_sent".into(), r.ts_ms.into());
        r.ts_ms = r.ts_ms.clamp(MIN_MS, MAX_MS);
    }
}

/// A record with the address it came from.
pub struct Incoming {
    pub record: LogRecord,
    pub source: std::net::IpAddr,
}

/// What a committed batch added.
#[derive(Debug)]
pub enum Stored {
    /// Every record (none was there before).
    All,
    /// The records with these ids; the others were there already.
    Only(HashSet<String>),
}

impl Stored {
    pub fn is_new(&self, id: &str) -> bool {
        match self {
            Stored::All => true,
            Stored::Only(ids) => ids.contains(id),
        }
    }

    /// How many of the batch's `total` records were new.
    pub fn count(&self, total: usize) -> usize {
        match self {
            Stored::All => total,
            Stored::Only(ids) => ids.len(),
        }
    }
}

/// Writes `batch` in one transaction, duplicates dropped; says which records were new. Tries a
/// binary COPY first (no per-row conflict check: the unique index refuses a duplicate and the
/// transaction goes back), then, only if that found a duplicate, the INSERT that skips them.
pub async fn write(c: &mut Client, batch: &[Incoming]) -> Result<Stored, tokio_postgres::Error> {
    let tx = c.transaction().await?;
    match copy(&tx, batch).await {
        Ok(()) => {
            tx.commit().await?;
            return Ok(Stored::All);
        }
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => tx.rollback().await?,
        Err(e) => return Err(e),
    }
    insert_new(c, batch).await.map(Stored::Only)
}

async fn copy(tx: &Transaction<'_>, batch: &[Incoming]) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in(COPY).await?;
    let mut w = std::pin::pin!(BinaryCopyInWriter::new(sink, &COPY_TYPES));
    for i in batch {
        let r = &i.record;
        w.as_mut()
            .write(&[
                &r.id,
                &Millis(r.ts_ms),
                &r.host,
                &i.source,
                &(r.level as i16),
                &r.target,
                &r.message,
                &Jsonb(&r.fields),
            ])
            .await?;
    }
    w.finish().await?;
    Ok(())
}

/// Inserts what is not there yet (by id) in one transaction; returns the ids that were new.
async fn insert_new(
    c: &mut Client,
    batch: &[Incoming],
) -> Result<HashSet<String>, tokio_postgres::Error> {
    let col = |f: &dyn Fn(&Incoming) -> String| batch.iter().map(f).collect::<Vec<String>>();
    let ids = col(&|r| r.record.id.clone());
    let ts: Vec<i64> = batch.iter().map(|r| r.record.ts_ms).collect();
    let hosts = col(&|r| r.record.host.clone());
    let ips = col(&|r| r.source.to_string());
    let levels: Vec<i16> = batch.iter().map(|r| r.record.level as i16).collect();
    let targets = col(&|r| r.record.target.clone());
    let messages = col(&|r| r.record.message.clone());
    let fields = col(&|r| serde_json::Value::Object(r.record.fields.clone()).to_string());
    let tx = c.transaction().await?;
    let rows = tx
        .query(
            INSERT,
            &[
                &ids, &ts, &hosts, &ips, &levels, &targets, &messages, &fields,
            ],
        )
        .await?;
    tx.commit().await?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// A time in Unix milliseconds, sent as a timestamptz (microseconds since 2000-01-01).
#[derive(Debug)]
struct Millis(i64);

impl ToSql for Millis {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // Refused when out of range, as the INSERT's to_timestamp does (PostgreSQL refuses what
        // is past its range; the two extremes would read as -infinity and infinity).
        let us = self
            .0
            .checked_sub(946_684_800_000)
            .and_then(|ms| ms.checked_mul(1000))
            .filter(|us| *us != i64::MIN && *us != i64::MAX)
            .ok_or("timestamp out of range")?;
        out.put_i64(us);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }

    to_sql_checked!();
}

/// Record fields, sent as jsonb (a version byte, then the JSON text).
#[derive(Debug)]
struct Jsonb<'a>(&'a serde_json::Map<String, serde_json::Value>);

impl ToSql for Jsonb<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_u8(1);
        serde_json::to_writer(out.writer(), self.0)?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

/// Deletes records older than `days`, a few thousand rows per transaction so the table stays
/// usable meanwhile; returns how many went.
pub async fn expire(c: &Client, days: u32) -> Result<u64, tokio_postgres::Error> {
    let mut total = 0;
    loop {
        let n = c
            .execute(
                "DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE ts < now() - make_interval(days => $1) LIMIT 5000)",
                &[&(days as i32)],
            )
            .await?;
        total += n;
        if n == 0 {
            return Ok(total);
        }
    }
}

/// Committed records after `seq`, oldest first, each with its original source address in
/// `fields._source` (for a replica, which takes it only from a logd).
pub async fn since(
    c: &Client,
    seq: i64,
    limit: i64,
) -> Result<Vec<(i64, LogRecord)>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT seq, id, (extract(epoch from ts) * 1000)::int8, host, host(source_ip), level, target, message, fields::text FROM records WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&seq, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let mut fields: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(r.get::<_, &str>(8)).unwrap_or_default();
            fields.insert(
                "_source".into(),
                serde_json::Value::String(r.get::<_, String>(4)),
            );
            let level = match r.get::<_, i16>(5) {
                0 => crate::proto::Level::Trace,
                1 => crate::proto::Level::Debug,
                2 => crate::proto::Level::Info,
                3 => crate::proto::Level::Warn,
                _ => crate::proto::Level::Error,
            };
            let rec = LogRecord {
                id: r.get(1),
                ts_ms: r.get(2),
                host: r.get(3),
                level,
                target: r.get(6),
                message: r.get(7),
                fields,
            };
            (r.get::<_, i64>(0), rec)
        })
        .collect())
}

/// The last record (by seq) a peer has acknowledged.
pub async fn replicated(c: &Client, peer: &str) -> Result<i64, tokio_postgres::Error> {
    Ok(
        c.query_opt("SELECT last_seq FROM replication WHERE peer = $1", &[&peer])
            .await?
            .map_or(0, |r| r.get(0)),
    )
}

pub async fn set_replicated(c: &Client, peer: &str, seq: i64) -> Result<(), tokio_postgres::Error> {
    c.execute("INSERT INTO replication (peer, last_seq) VALUES ($1, $2) ON CONFLICT (peer) DO UPDATE SET last_seq = $2", &[&peer, &seq]).await?;
    Ok(())
}
