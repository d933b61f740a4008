//! The documentation keeps up with the code: the flag table of `docs/configuration.md` is what
//! clap says of `infergate serve` (every flag, its variable, its help and default), and the
//! README and BENCHMARKS stay short enough for a newcomer. A table that has drifted is printed
//! in full; `INFERGATE_WRITE_DOCS=1 cargo test --test docs` writes it into the file.

use std::path::PathBuf;

use clap::Args;
use infergate::config::ServeArgs;

const BEGIN: &str = "<!-- flags: generated from `infergate serve --help` by tests/docs.rs -->";
const END: &str = "<!-- end of flags -->";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One row per flag of `infergate serve`, in clap's order.
fn flag_table() -> String {
    let cli = ServeArgs::augment_args(clap::Command::new("infergate"));
    let mut t = String::from("| flag | environment | meaning |\n|---|---|---|\n");
    for a in cli.get_arguments() {
        let Some(long) = a.get_long() else { continue };
        let value = a
            .get_value_names()
            .and_then(|v| v.first())
            .map(|v| format!(" <{v}>"))
            .unwrap_or_default();
        let env = a
            .get_env()
            .and_then(|e| e.to_str())
            .map(|e| format!("`{e}`"))
            .unwrap_or_default();
        let mut help = a
            .get_long_help()
            .or(a.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default()
            .replace('\n', " ")
            .replace('|', "\\|");
        let values: Vec<String> = a
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        if !values.is_empty() {
            help.push_str(&format!(" (one of {})", values.join(", ")));
        }
        let defaults: Vec<String> = a
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        if !defaults.is_empty() {
            help.push_str(&format!(" [default: {}]", defaults.join(",")));
        }
        t.push_str(&format!(
            "| `--{long}{value}` | {env} | {} |\n",
            help.trim()
        ));
    }
    t
}

#[test]
fn the_configuration_reference_lists_every_flag_as_clap_does() {
    let path = repo().join("docs/configuration.md");
    let doc = std::fs::read_to_string(&path).expect("docs/configuration.md");
    let (start, end) = (
        doc.find(BEGIN).expect("the generated-table marker") + BEGIN.len(),
        doc.find(END).expect("the end marker"),
    );
    let want = format!("\n{}", flag_table());
    if doc[start..end] == want {
        return;
    }
    if std::env::var_os("INFERGATE_WRITE_DOCS").is_some() {
        let updated = format!("{}{want}{}", &doc[..start], &doc[end..]);
        std::fs::write(&path, updated).unwrap();
        return;
    }
    panic!(
        "docs/configuration.md's flag table differs from `infergate serve --help`; \
         INFERGATE_WRITE_DOCS=1 cargo test --test docs writes it. Expected:\n{want}"
    );
}

/// Flags on an `infergate serve` or `infergate worker` command line in the docs exist.
#[test]
fn every_flag_on_an_infergate_command_line_in_the_docs_exists() {
    let cli = ServeArgs::augment_args(clap::Command::new("infergate"));
    let known: Vec<String> = cli
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .chain(["--help".to_string()])
        .collect();
    let mut files = vec![repo().join("README.md")];
    for e in std::fs::read_dir(repo().join("docs")).unwrap() {
        files.push(e.unwrap().path());
    }
    let mut checked = 0;
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for line in text.lines().filter(|l| {
            ["infergate serve ", "infergate worker ", "infergate config "]
                .iter()
                .any(|c| l.contains(c))
        }) {
            for word in line.split_whitespace().filter(|w| w.starts_with("--")) {
                let flag: String = word
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                if flag == "--" {
                    continue;
                }
                assert!(
                    known.contains(&flag),
                    "{} names {flag} on an infergate command line; `infergate serve` has no such flag",
                    f.display()
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 5, "only {checked} flags found on command lines");
}

#[test]
fn the_readme_and_the_benchmark_standing_stay_short() {
    for (file, max) in [
        ("README.md", 15 * 1024),
        ("loadtest/BENCHMARKS.md", 15 * 1024),
    ] {
        let len = std::fs::metadata(repo().join(file)).unwrap().len();
        assert!(
            len < max,
            "{file} is {len} bytes; keep it under {max} (detail goes to docs/ or loadtest/results/)"
        );
    }
}

/// The layout table of `docs/development.md` against the tree: every path its first column
/// names exists, every top-level source file has its row, and every file inside a module's
/// folder is named in that folder's row. A file added, moved or removed fails here until the
/// page says so.
#[test]
fn the_development_layout_names_every_source_file() {
    let root = repo();
    let page = std::fs::read_to_string(root.join("docs/development.md")).unwrap();
    let rows: Vec<(&str, &str)> = page
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| {
            let mut cells = l.split(" | ");
            Some((cells.next()?, l))
        })
        .collect();
    let mut wrong = Vec::new();
    for (first, _) in &rows {
        for path in first.split('`').skip(1).step_by(2) {
            if !root.join(path).exists() {
                wrong.push(format!("the page names {path}, which is not in the tree"));
            }
        }
    }
    let src = root.join("src");
    let mut top: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    top.sort();
    for path in top {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            let key = format!("`src/{name}/`");
            let Some((_, row)) = rows.iter().find(|(first, _)| first.contains(&key)) else {
                wrong.push(format!("no row names {key}"));
                continue;
            };
            let mut stack = vec![path.clone()];
            while let Some(dir) = stack.pop() {
                for e in std::fs::read_dir(&dir).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        stack.push(p);
                        continue;
                    }
                    let file = p.file_name().unwrap().to_string_lossy().to_string();
                    if file == "mod.rs" {
                        continue;
                    }
                    let rel = p.strip_prefix(&path).unwrap().to_string_lossy().to_string();
                    if !row.contains(&format!("`{rel}`")) && !row.contains(&format!("`{file}`")) {
                        wrong.push(format!("the row of {key} does not name `{rel}`"));
                    }
                }
            }
        } else if name != "lib.rs" && name != "main.rs" {
            let key = format!("`src/{name}`");
            if !rows.iter().any(|(first, _)| first.contains(&key)) {
                wrong.push(format!("no row names {key}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/development.md is out of date:\n{}",
        wrong.join("\n")
    );
}
