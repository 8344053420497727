//! Both backends behind one statement interface: [`Val`] crosses into either database, the
//! [`Sql`] trait runs a statement with `?N` placeholders on SQLite ([`Lite`]) or PostgreSQL
//! ([`Pg`], which rewrites them to `$N`), and PostgreSQL errors are rendered with their
//! SQLSTATE and detail.

use rusqlite::Connection;
use uuid::Uuid;

use super::RegistryError;


pub(super) fn pg_message(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut m = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            m.push_str(&format!("; {d}"));
        }
        return m;
    }
    let mut m = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        m.push_str(&format!(": {s}"));
        src = s.source();
    }
    m
}

/// A value crossing into either database: every column is an integer, a text or NULL
/// (booleans are integers 0/1 on the way out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Val {
    Null,
    Int(i64),
    Text(String),
}

impl From<i64> for Val {
    fn from(v: i64) -> Val {
        Val::Int(v)
    }
}
impl From<u32> for Val {
    fn from(v: u32) -> Val {
        Val::Int(v.into())
    }
}
impl From<Option<u32>> for Val {
    fn from(v: Option<u32>) -> Val {
        v.map_or(Val::Null, Val::from)
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Val {
        Val::Text(v.to_string())
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Val {
        Val::Text(v.clone())
    }
}
impl From<Option<&String>> for Val {
    fn from(v: Option<&String>) -> Val {
        v.map_or(Val::Null, Val::from)
    }
}
impl From<Uuid> for Val {
    fn from(v: Uuid) -> Val {
        Val::Text(v.to_string())
    }
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Val::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Val::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Val::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

impl postgres::types::ToSql for Val {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::{IsNull, Type};
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                _ => Err(format!("integer parameter for a {ty} column").into()),
            },
            Val::Text(s) => s.as_str().to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// Statements against either database. SQL is written once, with `$N` placeholders
/// (PostgreSQL's; rewritten to SQLite's `?N`) and only syntax both accept.
pub(super) trait Sql {
    fn rows(&mut self, sql: &str, p: &[Val]) -> Result<Vec<Vec<Val>>, RegistryError>;
    fn exec(&mut self, sql: &str, p: &[Val]) -> Result<u64, RegistryError>;
    fn batch(&mut self, sql: &str) -> Result<(), RegistryError>;
    fn postgres(&self) -> bool;
}

fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

pub(super) struct Lite<'a>(pub(super) &'a Connection);

impl Sql for Lite<'_> {
    fn rows(&mut self, sql: &str, p: &[Val]) -> Result<Vec<Vec<Val>>, RegistryError> {
        let mut stmt = self.0.prepare(&sqlite_sql(sql))?;
        let n = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(p))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(n);
            for i in 0..n {
                use rusqlite::types::ValueRef;
                row.push(match r.get_ref(i)? {
                    ValueRef::Null => Val::Null,
                    ValueRef::Integer(i) => Val::Int(i),
                    ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Real(f) => Val::Text(f.to_string()),
                    ValueRef::Blob(b) => Val::Text(String::from_utf8_lossy(b).into_owned()),
                });
            }
            out.push(row);
        }
        Ok(out)
    }

    fn exec(&mut self, sql: &str, p: &[Val]) -> Result<u64, RegistryError> {
        Ok(self
            .0
            .execute(&sqlite_sql(sql), rusqlite::params_from_iter(p))? as u64)
    }

    fn batch(&mut self, sql: &str) -> Result<(), RegistryError> {
        Ok(self.0.execute_batch(sql)?)
    }

    fn postgres(&self) -> bool {
        false
    }
}

pub(super) struct Pg<'a, C: postgres::GenericClient>(pub(super) &'a mut C);

fn pg_params(p: &[Val]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    p.iter()
        .map(|v| v as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

impl<C: postgres::GenericClient> Sql for Pg<'_, C> {
    fn rows(&mut self, sql: &str, p: &[Val]) -> Result<Vec<Vec<Val>>, RegistryError> {
        use postgres::types::Type;
        let rows = self.0.query(sql, &pg_params(p))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let mut row = Vec::with_capacity(r.len());
            for (i, c) in r.columns().iter().enumerate() {
                let v = match *c.type_() {
                    Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Val::Int),
                    Type::INT4 => r.try_get::<_, Option<i32>>(i)?.map(|v| Val::Int(v.into())),
                    Type::INT2 => r.try_get::<_, Option<i16>>(i)?.map(|v| Val::Int(v.into())),
                    Type::BOOL => r.try_get::<_, Option<bool>>(i)?.map(|v| Val::Int(v.into())),
                    _ => r.try_get::<_, Option<String>>(i)?.map(Val::Text),
                };
                row.push(v.unwrap_or(Val::Null));
            }
            out.push(row);
        }
        Ok(out)
    }

    fn exec(&mut self, sql: &str, p: &[Val]) -> Result<u64, RegistryError> {
        Ok(self.0.execute(sql, &pg_params(p))?)
    }

    fn batch(&mut self, sql: &str) -> Result<(), RegistryError> {
        Ok(self.0.batch_execute(sql)?)
    }

    fn postgres(&self) -> bool {
        true
    }
}
