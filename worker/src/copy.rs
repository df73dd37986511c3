//! A small encoder for PostgreSQL's binary `COPY ... FROM STDIN (FORMAT binary)` format, the
//! fastest way to bulk-load rows. Handlers use it inside the batch transaction:
//!
//! ```no_run
//! # async fn f(tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
//! use streamops_worker::copy::BinaryCopy;
//! let mut rows = BinaryCopy::new(2);
//! rows.row().text("AAPL").float8(150.25);
//! rows.load(tx, "COPY quotes (symbol, price) FROM STDIN (FORMAT binary)").await?;
//! # Ok(()) }
//! ```

use chrono::{DateTime, Utc};

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A buffer of rows in the binary COPY format.
#[derive(Debug, Clone)]
pub struct BinaryCopy {
    buf: Vec<u8>,
    columns: i16,
    rows: usize,
}

/// One row being written; every column must be written, in the statement's column order.
pub struct RowWriter<'a> {
    buf: &'a mut Vec<u8>,
}

impl BinaryCopy {
    /// An empty buffer for rows of `columns` columns.
    pub fn new(columns: i16) -> Self {
        Self::with_capacity(columns, 0)
    }

    /// An empty buffer with room for about `bytes` bytes.
    pub fn with_capacity(columns: i16, bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes + 32);
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        Self {
            buf,
            columns,
            rows: 0,
        }
    }

    /// Starts a row.
    pub fn row(&mut self) -> RowWriter<'_> {
        self.rows += 1;
        self.buf.extend_from_slice(&self.columns.to_be_bytes());
        RowWriter { buf: &mut self.buf }
    }

    /// Rows written so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether no row was written.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The complete COPY payload, trailer included.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }

    /// Sends the rows with `statement` (a `COPY ... FROM STDIN (FORMAT binary)`) on `conn`.
    /// Does nothing when there are no rows. Returns the number of rows loaded.
    pub async fn load(
        self,
        conn: &mut sqlx::PgConnection,
        statement: &str,
    ) -> Result<u64, sqlx::Error> {
        if self.is_empty() {
            return Ok(0);
        }
        let data = self.finish();
        let mut copy = conn.copy_in_raw(statement).await?;
        // Send in chunks so no single protocol message gets huge.
        for chunk in data.chunks(1 << 20) {
            copy.send(chunk).await?;
        }
        copy.finish().await
    }
}

/// How [`copy_or_insert`] wrote the rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyOrInsert<T> {
    /// Every COPY went through: the rows loaded by each, in order.
    Copied(Vec<u64>),
    /// A COPY hit a unique violation; the fallback wrote the rows and returned this.
    Inserted(T),
}

/// SQLSTATE of a unique violation.
const UNIQUE_VIOLATION: &str = "23505";

/// The fast path with a safe fallback, inside the caller's transaction: loads each
/// `(rows, statement)` by binary COPY under the savepoint `savepoint` (an SQL identifier written
/// in the code, never input). COPY cannot skip a row
/// whose key is already stored (a replay of committed messages, or a key repeated within the
/// batch); on such a unique violation everything the COPYs did is rolled back to the savepoint and
/// `fallback` writes the same rows instead, typically with `INSERT ... ON CONFLICT DO NOTHING`.
/// Any other error is returned as is (the caller's transaction is then aborted).
pub async fn copy_or_insert<'c, T, E, F, Fut>(
    conn: &'c mut sqlx::PgConnection,
    savepoint: &'static str,
    copies: Vec<(BinaryCopy, &str)>,
    fallback: F,
) -> Result<CopyOrInsert<T>, E>
where
    E: From<sqlx::Error>,
    F: FnOnce(&'c mut sqlx::PgConnection) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    sqlx::query(&format!("SAVEPOINT {savepoint}"))
        .execute(&mut *conn)
        .await?;
    let mut loaded = Vec::with_capacity(copies.len());
    let mut violation = false;
    for (rows, statement) in copies {
        match rows.load(conn, statement).await {
            Ok(n) => loaded.push(n),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNIQUE_VIOLATION) => {
                violation = true;
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !violation {
        sqlx::query(&format!("RELEASE SAVEPOINT {savepoint}"))
            .execute(&mut *conn)
            .await?;
        return Ok(CopyOrInsert::Copied(loaded));
    }
    sqlx::query(&format!("ROLLBACK TO SAVEPOINT {savepoint}"))
        .execute(&mut *conn)
        .await?;
    fallback(conn).await.map(CopyOrInsert::Inserted)
}

impl RowWriter<'_> {
    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf
            .extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(bytes);
        self
    }

    /// A `text` / `varchar` value.
    pub fn text(&mut self, v: &str) -> &mut Self {
        self.field(v.as_bytes())
    }

    /// A nullable `text` value.
    pub fn opt_text(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => self.text(v),
            None => self.null(),
        }
    }

    /// A `bytea` value.
    pub fn bytea(&mut self, v: &[u8]) -> &mut Self {
        self.field(v)
    }

    /// An `int4` value.
    pub fn int4(&mut self, v: i32) -> &mut Self {
        self.field(&v.to_be_bytes())
    }

    /// An `int8` value.
    pub fn int8(&mut self, v: i64) -> &mut Self {
        self.field(&v.to_be_bytes())
    }

    /// A `float8` value.
    pub fn float8(&mut self, v: f64) -> &mut Self {
        self.field(&v.to_bits().to_be_bytes())
    }

    /// A `bool` value.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.field(&[u8::from(v)])
    }

    /// A `timestamptz` value (microsecond precision).
    pub fn timestamptz(&mut self, v: DateTime<Utc>) -> &mut Self {
        let micros = v.timestamp_micros() - PG_EPOCH_OFFSET_MICROS;
        self.field(&micros.to_be_bytes())
    }

    /// A `uuid` value.
    pub fn uuid(&mut self, v: &uuid::Uuid) -> &mut Self {
        self.field(v.as_bytes())
    }

    /// A `jsonb` value (version 1 text).
    pub fn jsonb(&mut self, json: &str) -> &mut Self {
        self.buf
            .extend_from_slice(&((json.len() + 1) as i32).to_be_bytes());
        self.buf.push(1);
        self.buf.extend_from_slice(json.as_bytes());
        self
    }

    /// SQL NULL.
    pub fn null(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_header_rows_and_trailer() {
        let mut c = BinaryCopy::new(2);
        c.row().int4(7).null();
        let bytes = c.finish();
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0, 2]);
        expected.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 7]);
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn timestamps_count_microseconds_from_2000() {
        let mut c = BinaryCopy::new(1);
        let t = DateTime::parse_from_rfc3339("2000-01-01T00:00:01Z")
            .unwrap()
            .with_timezone(&Utc);
        c.row().timestamptz(t);
        let bytes = c.finish();
        let field = &bytes[19 + 2 + 4..19 + 2 + 4 + 8];
        assert_eq!(i64::from_be_bytes(field.try_into().unwrap()), 1_000_000);
    }
}
