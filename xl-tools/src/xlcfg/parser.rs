//! The lexer and parser of xl.cfg(5) text (libxlutil's grammar), strict where xl is lenient:
//! every error carries `line:column`, names the key and the fix.

use std::collections::BTreeMap;

use super::vtpm::validate_vtpm_value;
use super::{Entry, ParseError, ParseErrorKind, Value, VtpmSpec, XlConfig, is_known_key, parse_c_long, unknown_key_hint};

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Number(String),
    Str(String),
    LBracket,
    RBracket,
    Comma,
    Eq,
    PlusEq,
    Semi,
    /// End of line; carries a comment that ended the line, verbatim.
    Newline(Option<String>),
    Eof,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("word `{s}`"),
            Tok::Number(s) => format!("number `{s}`"),
            Tok::Str(_) => "string".into(),
            Tok::LBracket => "`[`".into(),
            Tok::RBracket => "`]`".into(),
            Tok::Comma => "`,`".into(),
            Tok::Eq => "`=`".into(),
            Tok::PlusEq => "`+=`".into(),
            Tok::Semi => "`;`".into(),
            Tok::Newline(_) => "end of line".into(),
            Tok::Eof => "end of file".into(),
        }
    }
}

/// A value with the position of its first token (for error messages).
enum PValue {
    Atom(Value, u32, u32),
    List(Vec<PValue>),
}

impl PValue {
    fn into_value(self) -> Value {
        match self {
            PValue::Atom(v, ..) => v,
            PValue::List(items) => Value::List(items.into_iter().map(PValue::into_value).collect()),
        }
    }
}

pub(super) struct Parser<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: u32,
    col: u32,
    peeked: Option<(Tok, u32, u32)>,
    validate_vtpm: bool,
}

impl<'a> Parser<'a> {
    pub(super) fn new(src: &'a str, validate_vtpm: bool) -> Self {
        Parser {
            chars: src.chars().peekable(),
            line: 1,
            col: 1,
            peeked: None,
            validate_vtpm,
        }
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn err<T>(&self, line: u32, col: u32, kind: ParseErrorKind) -> Result<T, ParseError> {
        Err(ParseError { line, col, kind })
    }

    fn lex(&mut self) -> Result<(Tok, u32, u32), ParseError> {
        while matches!(self.chars.peek(), Some(' ' | '\t' | '\r')) {
            self.bump();
        }
        let (line, col) = (self.line, self.col);
        let Some(&c) = self.chars.peek() else {
            return Ok((Tok::Eof, line, col));
        };
        let tok = match c {
            '\n' => {
                self.bump();
                Tok::Newline(None)
            }
            '#' => {
                let mut text = String::new();
                while let Some(&c) = self.chars.peek() {
                    if c == '\n' {
                        break;
                    }
                    text.push(c);
                    self.bump();
                }
                self.bump();
                Tok::Newline(Some(text.trim_end().to_owned()))
            }
            '[' | ']' | ',' | '=' | ';' => {
                self.bump();
                match c {
                    '[' => Tok::LBracket,
                    ']' => Tok::RBracket,
                    ',' => Tok::Comma,
                    '=' => Tok::Eq,
                    _ => Tok::Semi,
                }
            }
            '+' => {
                self.bump();
                if self.chars.peek() == Some(&'=') {
                    self.bump();
                    Tok::PlusEq
                } else {
                    return self.err(line, col, ParseErrorKind::Unexpected {
                        found: "`+`".into(),
                        expected: "`+=` (xl.cfg has no arithmetic)",
                    });
                }
            }
            '"' | '\'' => Tok::Str(self.string(c, line, col)?),
            c if c.is_ascii_digit() => {
                let mut text = String::new();
                while let Some(&c) = self.chars.peek() {
                    if !c.is_ascii_alphanumeric() && c != '.' {
                        break;
                    }
                    text.push(c);
                    self.bump();
                }
                Tok::Number(text)
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut text = String::new();
                while let Some(&c) = self.chars.peek() {
                    if !c.is_ascii_alphanumeric() && c != '_' && c != '.' {
                        break;
                    }
                    text.push(c);
                    self.bump();
                }
                Tok::Ident(text)
            }
            '-' => {
                return self.err(line, col, ParseErrorKind::Unexpected {
                    found: "`-`".into(),
                    expected: "a value (xl.cfg numbers cannot be negative; quote strings)",
                })
            }
            other => {
                return self.err(line, col, ParseErrorKind::Unexpected {
                    found: format!("character `{}`", other.escape_default()),
                    expected: "a key, a value, `[`, `]`, `,`, `=` or `;` (is a string missing its quotes?)",
                })
            }
        };
        Ok((tok, line, col))
    }

    fn string(&mut self, q: char, line: u32, col: u32) -> Result<String, ParseError> {
        self.bump();
        let mut out = String::new();
        loop {
            let (el, ec) = (self.line, self.col);
            match self.bump() {
                None | Some('\n') => {
                    return self.err(line, col, ParseErrorKind::UnterminatedString(q));
                }
                Some(c) if c == q => return Ok(out),
                Some('\\') => {
                    let Some(e) = self.bump() else {
                        return self.err(line, col, ParseErrorKind::UnterminatedString(q));
                    };
                    match e {
                        '"' | '\'' | '\\' => out.push(e),
                        'a' => out.push('\x07'),
                        'b' => out.push('\x08'),
                        'f' => out.push('\x0c'),
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        't' => out.push('\t'),
                        'v' => out.push('\x0b'),
                        'x' => {
                            let mut h = String::new();
                            for _ in 0..2 {
                                match self.chars.peek() {
                                    Some(c) if c.is_ascii_hexdigit() => {
                                        h.push(*c);
                                        self.bump();
                                    }
                                    _ => break,
                                }
                            }
                            if h.len() != 2 {
                                return self.err(el, ec, ParseErrorKind::BadEscape(
                                    "`\\x` needs exactly two hex digits, e.g. \\x41".into(),
                                ));
                            }
                            let b = u8::from_str_radix(&h, 16).expect("two hex digits");
                            if b >= 0x80 || b == 0 {
                                return self.err(el, ec, ParseErrorKind::BadEscape(format!(
                                    "`\\x{h}` is not a printable ASCII byte; write the character itself"
                                )));
                            }
                            out.push(b as char);
                        }
                        '0'..='7' => {
                            return self.err(el, ec, ParseErrorKind::BadEscape(
                                "xl reads `\\NNN` digits as decimal, not octal; write `\\xHH` instead".into(),
                            ))
                        }
                        other => {
                            return self.err(el, ec, ParseErrorKind::BadEscape(format!(
                                "`\\{}` is not an escape xl knows; write `\\\\` for a backslash",
                                other.escape_default()
                            )))
                        }
                    }
                }
                Some(c) => out.push(c),
            }
        }
    }

    fn peek(&mut self) -> Result<&(Tok, u32, u32), ParseError> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lex()?);
        }
        Ok(self.peeked.as_ref().expect("just filled"))
    }

    fn next(&mut self) -> Result<(Tok, u32, u32), ParseError> {
        self.peek()?;
        Ok(self.peeked.take().expect("just filled"))
    }

    fn skip_newlines(&mut self) -> Result<(), ParseError> {
        while matches!(self.peek()?.0, Tok::Newline(_)) {
            self.next()?;
        }
        Ok(())
    }

    pub(super) fn file(mut self) -> Result<XlConfig, ParseError> {
        let mut cfg = XlConfig::default();
        let mut pending: Vec<String> = Vec::new();
        // Whether the current line already holds a statement (so a blank "\n" is its end).
        let mut line_has_stmt = false;
        // (key, line) of `=` settings seen, for duplicate detection.
        let mut seen: BTreeMap<String, u32> = BTreeMap::new();
        loop {
            let (tok, line, col) = self.next()?;
            match tok {
                Tok::Eof => break,
                Tok::Newline(c) => {
                    if !line_has_stmt {
                        pending.push(c.unwrap_or_default());
                    }
                    line_has_stmt = false;
                }
                Tok::Semi => {}
                Tok::Ident(key) => {
                    let (op, oline, ocol) = self.next()?;
                    let append = match op {
                        Tok::Eq => false,
                        Tok::PlusEq => true,
                        other => {
                            return self.err(
                                oline,
                                ocol,
                                ParseErrorKind::Unexpected {
                                    found: other.describe(),
                                    expected: "`=` after a key",
                                },
                            );
                        }
                    };
                    if !is_known_key(&key) {
                        return self.err(
                            line,
                            col,
                            ParseErrorKind::UnknownKey {
                                hint: unknown_key_hint(&key),
                                key,
                            },
                        );
                    }
                    let pv = self.value()?;
                    if key == "vtpm" && self.validate_vtpm {
                        check_vtpm_pvalue(&pv)?;
                    }
                    let value = pv.into_value();
                    // End of statement: newline (maybe with comment), `;` or end of file.
                    let (end, eline, ecol) = self.next()?;
                    line_has_stmt = matches!(end, Tok::Semi);
                    let trailing = match end {
                        Tok::Newline(c) => c,
                        Tok::Semi | Tok::Eof => None,
                        other => {
                            return self.err(eline, ecol, ParseErrorKind::Unexpected {
                                found: other.describe(),
                                expected: "end of line or `;` after a value (is a list missing its `[`?)",
                            })
                        }
                    };
                    if let Some(&first_line) = seen.get(&key) {
                        if !append {
                            return self.err(
                                line,
                                col,
                                ParseErrorKind::DuplicateKey {
                                    key,
                                    first_line,
                                    second_line: line,
                                },
                            );
                        }
                        let e = cfg.entries.iter_mut().find(|e| e.key == key).expect("seen");
                        append_value(&key, &mut e.value, value).map_err(|kind| ParseError {
                            line,
                            col,
                            kind,
                        })?;
                        if key == "vtpm" && self.validate_vtpm {
                            validate_vtpm_value(&e.value).map_err(|kind| ParseError {
                                line,
                                col,
                                kind,
                            })?;
                        }
                        pending.clear();
                        continue;
                    }
                    seen.insert(key.clone(), line);
                    cfg.entries.push(Entry {
                        key,
                        value,
                        line,
                        col,
                        leading: std::mem::take(&mut pending),
                        trailing,
                    });
                }
                other => {
                    return self.err(
                        line,
                        col,
                        ParseErrorKind::Unexpected {
                            found: other.describe(),
                            expected: "a key (`name = value`) at the start of a statement",
                        },
                    );
                }
            }
        }
        cfg.tail = pending;
        Ok(cfg)
    }

    fn value(&mut self) -> Result<PValue, ParseError> {
        let (tok, line, col) = self.next()?;
        match tok {
            Tok::Str(s) => Ok(PValue::Atom(Value::Str(s), line, col)),
            Tok::Number(text) => match parse_c_long(&text) {
                Some(i) => Ok(PValue::Atom(Value::Int(i), line, col)),
                None => self.err(
                    line,
                    col,
                    ParseErrorKind::BadNumber {
                        hint: if text.starts_with('0') && !text.starts_with("0x") && text.len() > 1
                        {
                            "a leading 0 makes xl read octal; drop the 0 or quote a string"
                        } else {
                            "write decimal digits or 0x-prefixed hex, or quote it as a string"
                        },
                        text,
                    },
                ),
            },
            Tok::LBracket => {
                let mut items = Vec::new();
                self.skip_newlines()?;
                loop {
                    if matches!(self.peek()?.0, Tok::RBracket) {
                        self.next()?;
                        return Ok(PValue::List(items));
                    }
                    items.push(self.value()?);
                    self.skip_newlines()?;
                    let (t, l, c) = self.next()?;
                    match t {
                        Tok::Comma => self.skip_newlines()?,
                        Tok::RBracket => return Ok(PValue::List(items)),
                        other => {
                            return self.err(
                                l,
                                c,
                                ParseErrorKind::Unexpected {
                                    found: other.describe(),
                                    expected: "`,` or `]` in a list",
                                },
                            );
                        }
                    }
                }
            }
            Tok::Ident(word) => self.err(
                line,
                col,
                ParseErrorKind::Unexpected {
                    found: format!("word `{word}`"),
                    expected: "a value: quote strings (\"…\"), e.g. \"destroy\"",
                },
            ),
            other => self.err(
                line,
                col,
                ParseErrorKind::Unexpected {
                    found: other.describe(),
                    expected: "a value: a \"string\", a number or a [ list ]",
                },
            ),
        }
    }
}

fn check_vtpm_pvalue(pv: &PValue) -> Result<(), ParseError> {
    let PValue::List(items) = pv else {
        let PValue::Atom(v, line, col) = pv else {
            unreachable!()
        };
        return Err(ParseError {
            line: *line,
            col: *col,
            kind: ParseErrorKind::WrongType {
                key: "vtpm".into(),
                expected: "a list of spec strings, e.g. vtpm = [ \"backend=vtpm-guest1\" ]",
                found: v.kind(),
            },
        });
    };
    for (index, item) in items.iter().enumerate() {
        match item {
            PValue::Atom(Value::Str(s), line, col) => {
                s.parse::<VtpmSpec>().map_err(|error| ParseError {
                    line: *line,
                    col: *col,
                    kind: ParseErrorKind::Vtpm { index, error },
                })?;
            }
            PValue::Atom(v, line, col) => {
                return Err(ParseError {
                    line: *line,
                    col: *col,
                    kind: ParseErrorKind::WrongType {
                        key: "vtpm".into(),
                        expected: "a list of spec strings",
                        found: v.kind(),
                    },
                });
            }
            PValue::List(_) => {
                return Err(ParseError {
                    line: 0,
                    col: 0,
                    kind: ParseErrorKind::WrongType {
                        key: "vtpm".into(),
                        expected: "a list of spec strings",
                        found: "list",
                    },
                });
            }
        }
    }
    Ok(())
}

fn append_value(key: &str, have: &mut Value, add: Value) -> Result<(), ParseErrorKind> {
    match (have, add) {
        (Value::Str(a), Value::Str(b)) => {
            a.push_str(&b);
            Ok(())
        }
        (Value::List(a), Value::List(b)) => {
            a.extend(b);
            Ok(())
        }
        (have, add) => Err(ParseErrorKind::BadAppend {
            key: key.to_owned(),
            have: have.kind(),
            add: add.kind(),
            hint: if matches!(have, Value::Int(_)) || matches!(add, Value::Int(_)) {
                "xl cannot use += with numbers; set the number once with `=`"
            } else {
                "append a list to a list, or a string to a string"
            },
        }),
    }
}
