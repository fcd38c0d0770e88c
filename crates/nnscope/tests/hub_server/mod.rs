//! A small stand-in for the Hugging Face Hub on 127.0.0.1, for download tests without internet.
//! It speaks what the client uses: `GET /api/models/{repo}/revision/{rev}` (commit and file list),
//! `HEAD`/`GET /{repo}/resolve/{rev}/{file}` with `ETag`, `X-Repo-Commit`, `X-Linked-Etag` and
//! `X-Linked-Size`, large files (`*.safetensors`) redirected to a second listener (another origin,
//! like the hub's storage) that honours `Range`, `X-Error-Code` 401/403/404 answers, and odd
//! redirects. Each connection serves one request (`Connection: close`).
#![allow(dead_code)]

use sha2::Digest;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

pub fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// One repository: its files and which commit each revision name points at.
#[derive(Clone, Default)]
pub struct Repo {
    pub files: Vec<(String, Vec<u8>)>,
    /// revision name (or commit) -> commit.
    pub revisions: HashMap<String, String>,
    /// Token that has access; `Some` makes the repository gated.
    pub gated_token: Option<String>,
    /// Serve large files with one byte changed (their announced sha256 stays the true one).
    pub corrupt: bool,
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub auth: Option<String>,
}

#[derive(Default)]
pub struct State {
    pub repos: HashMap<String, Repo>,
    pub log: Vec<Logged>,
    /// sha256 of blobs whose next full download is cut halfway.
    pub cut_next: HashSet<String>,
}

pub struct Server {
    pub url: String,
    pub cdn_url: String,
    pub state: Arc<Mutex<State>>,
}

impl Server {
    pub fn start(repos: HashMap<String, Repo>) -> Server {
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}", hub.local_addr().unwrap().port());
        let cdn_url = format!("http://127.0.0.1:{}", cdn.local_addr().unwrap().port());
        let state = Arc::new(Mutex::new(State {
            repos,
            ..Default::default()
        }));
        for (l, is_cdn) in [(hub, false), (cdn, true)] {
            let st = state.clone();
            let cdn_url = cdn_url.clone();
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(conn) = conn else { continue };
                    let st = st.clone();
                    let cdn_url = cdn_url.clone();
                    std::thread::spawn(move || {
                        let _ = handle(conn, &st, is_cdn, &cdn_url);
                    });
                }
            });
        }
        Server {
            url,
            cdn_url,
            state,
        }
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }
}

/// An address nothing listens on.
pub fn dead_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then close.
    cut: Option<usize>,
}

fn resp(status: u16) -> Resp {
    Resp {
        status,
        headers: vec![],
        body: vec![],
        cut: None,
    }
}

fn h(r: &mut Resp, k: &str, v: impl Into<String>) {
    r.headers.push((k.to_string(), v.into()));
}

fn error(status: u16, code: &str) -> Resp {
    let mut r = resp(status);
    h(&mut r, "X-Error-Code", code);
    r.body = format!("{{\"error\":\"{code}\"}}").into_bytes();
    r
}

fn handle(conn: TcpStream, st: &Mutex<State>, is_cdn: bool, cdn_url: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l)? == 0 || l.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let logged = Logged {
        method: method.clone(),
        path: path.clone(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
    };
    let r = {
        let mut s = st.lock().unwrap();
        s.log.push(logged.clone());
        if is_cdn {
            cdn(&mut s, &path, logged.range.as_deref())
        } else {
            hub(&s, &path, logged.auth.as_deref(), cdn_url)
        }
    };
    let mut w = conn;
    let reason = match r.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", r.status);
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        r.body.len()
    ));
    w.write_all(head.as_bytes())?;
    if method != "HEAD" {
        let n = r.cut.unwrap_or(r.body.len());
        w.write_all(&r.body[..n])?;
    }
    w.flush()?;
    let _ = w.shutdown(std::net::Shutdown::Both);
    let _ = reader.read(&mut [0u8; 1]);
    Ok(())
}

fn hub(s: &State, path: &str, auth: Option<&str>, cdn_url: &str) -> Resp {
    if let Some(rest) = path.strip_prefix("/api/models/") {
        // {owner}/{name}/revision/{rev}
        let p: Vec<&str> = rest.splitn(4, '/').collect();
        if p.len() != 4 || p[2] != "revision" {
            return error(404, "");
        }
        let repo = format!("{}/{}", p[0], p[1]);
        let rev = p[3].replace("%2F", "/");
        match repo.as_str() {
            "org/moved" => {
                let mut r = resp(307);
                h(
                    &mut r,
                    "Location",
                    format!("/api/models/org/tiny/revision/{}", p[3]),
                );
                return r;
            }
            "org/noloc" => return resp(302),
            "org/loop" => {
                let mut r = resp(302);
                h(&mut r, "Location", "/api/models/org/loop/revision/main");
                return r;
            }
            _ => {}
        }
        let Some(rp) = s.repos.get(&repo) else {
            return error(401, "RepoNotFound");
        };
        let Some(commit) = rp.revisions.get(&rev) else {
            return error(404, "RevisionNotFound");
        };
        let siblings: Vec<serde_json::Value> = rp
            .files
            .iter()
            .map(|(f, _)| serde_json::json!({ "rfilename": f }))
            .collect();
        let mut r = resp(200);
        h(&mut r, "Content-Type", "application/json");
        r.body = serde_json::json!({"id": repo, "sha": commit, "siblings": siblings})
            .to_string()
            .into_bytes();
        return r;
    }
    // /{owner}/{name}/resolve/{rev}/{file}
    let p: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if p.len() != 5 || p[2] != "resolve" {
        return error(404, "");
    }
    let repo = format!("{}/{}", p[0], p[1]);
    if repo == "org/moved" {
        let mut r = resp(307);
        h(
            &mut r,
            "Location",
            format!("/org/tiny/resolve/{}/{}", p[3], p[4]),
        );
        return r;
    }
    let Some(rp) = s.repos.get(&repo) else {
        return error(401, "RepoNotFound");
    };
    let Some(commit) = rp.revisions.get(p[3]) else {
        return error(404, "RevisionNotFound");
    };
    if let Some(tok) = &rp.gated_token {
        match auth {
            None => return error(401, "GatedRepo"),
            Some(a) if a != format!("Bearer {tok}") => return error(403, "GatedRepo"),
            _ => {}
        }
    }
    let file = p[4].replace("%20", " ");
    let Some((_, data)) = rp.files.iter().find(|(f, _)| *f == file) else {
        return error(404, "EntryNotFound");
    };
    let sha = sha256_hex(data);
    if file.ends_with(".safetensors") {
        let mut r = resp(302);
        h(&mut r, "Location", format!("{cdn_url}/cdn/{repo}/{sha}"));
        h(&mut r, "X-Linked-Etag", format!("\"{sha}\""));
        h(&mut r, "X-Linked-Size", data.len().to_string());
        h(&mut r, "X-Repo-Commit", commit.clone());
        h(
            &mut r,
            "ETag",
            "\"git-pointer-etag-0000000000000000000000\"",
        );
        return r;
    }
    let mut r = resp(200);
    h(&mut r, "ETag", format!("\"{}\"", &sha[..40]));
    h(&mut r, "X-Repo-Commit", commit.clone());
    r.body = data.clone();
    r
}

fn cdn(s: &mut State, path: &str, range: Option<&str>) -> Resp {
    let Some((repo, sha)) = path.strip_prefix("/cdn/").and_then(|p| p.rsplit_once('/')) else {
        return resp(404);
    };
    let mut found = None;
    if let Some(rp) = s.repos.get(repo) {
        for (_, d) in &rp.files {
            if sha256_hex(d) == sha {
                let mut d = d.clone();
                if rp.corrupt {
                    let n = d.len() / 2;
                    d[n] ^= 0xff;
                }
                found = Some(d);
            }
        }
    }
    let Some(data) = found else {
        return resp(404);
    };
    let mut r = resp(200);
    h(&mut r, "ETag", format!("\"{sha}\""));
    if let Some(start) = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
    {
        if start >= data.len() {
            return resp(416);
        }
        r.status = 206;
        h(
            &mut r,
            "Content-Range",
            format!("bytes {start}-{}/{}", data.len() - 1, data.len()),
        );
        r.body = data[start..].to_vec();
        return r;
    }
    if s.cut_next.remove(sha) {
        r.cut = Some(data.len() / 2);
    }
    r.body = data;
    r
}
