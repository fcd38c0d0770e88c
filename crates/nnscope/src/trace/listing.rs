//! `.source` listings in nnsight's layout: every source line numbered from 0, the first hookpoint of
//! a line at its left, further hookpoints of that line below it as `name ->  + ...`.

use super::rt::FnInfo;

/// The listing of an instrumented function; the line of `mark` (a label) is flagged with `>>`.
pub fn listing(info: &FnInfo, mark: Option<&str>) -> String {
    let width = info
        .labels
        .iter()
        .map(|l| l.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let num_w = info.lines.len().saturating_sub(1).to_string().len();
    let mut out = String::new();
    for (i, text) in info.lines.iter().enumerate() {
        let file_line = info.first_line + i as u32;
        let sites: Vec<&str> = info
            .site_lines
            .iter()
            .zip(info.labels.iter())
            .filter(|(l, _)| **l == file_line)
            .map(|(_, lab)| *lab)
            .collect();
        match sites.split_first() {
            None => out.push_str(&format!("   {:width$}    {:>num_w$} {}\n", "", i, text)),
            Some((first, more)) => {
                let m = if Some(*first) == mark { ">> " } else { "   " };
                out.push_str(&format!("{m}{first:width$} -> {i:>num_w$} {text}\n"));
                for lab in more {
                    let m = if Some(*lab) == mark { ">> " } else { "   " };
                    out.push_str(&format!("{m}{lab:width$} -> {:>num_w$} ...\n", "+"));
                }
            }
        }
    }
    out
}
