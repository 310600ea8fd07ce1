//! Every flag and argument of every `spo` subcommand has help text, so
//! `spo <command> --help` is enough to use the CLI.

/// The subcommands, as a user types them.
const COMMANDS: &[&[&str]] = &[
    &["generate"],
    &["lora", "inspect"],
    &["grad"],
    &["train"],
    &["score"],
    &["info"],
];

/// The argument lines of a clap help text that carry no description: a line
/// naming an argument (`-x, --flag <V>`, `--flag`, `<ARG>`) with nothing after
/// the name, and no more-indented description on the next line.
fn undocumented(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let body = line.trim_start();
        let indent = line.len() - body.len();
        if indent == 0 || !(body.starts_with('-') || body.starts_with('<') || body.starts_with('['))
        {
            continue;
        }
        // clap separates the argument from its description by two spaces or more.
        if let Some((_, text)) = body.trim_end().split_once("  ") {
            if describes(text) {
                continue;
            }
        }
        let next_is_description = lines.get(i + 1).is_some_and(|n| {
            let t = n.trim_start();
            n.len() - t.len() > indent && !t.starts_with('-') && describes(t)
        });
        if !next_is_description {
            out.push(body.to_owned());
        }
    }
    out
}

/// Whether help text says something beyond clap's own `[default: ...]`.
fn describes(text: &str) -> bool {
    let mut rest = text.trim().to_owned();
    while let (Some(a), Some(b)) = (rest.find("[default:"), rest.find(']')) {
        if b < a {
            break;
        }
        rest.replace_range(a..=b, "");
    }
    !rest.trim().is_empty()
}

#[test]
fn every_cli_argument_has_help() {
    let mut missing = Vec::new();
    for cmd in COMMANDS {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_spo"))
            .args(*cmd)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "spo {} --help failed", cmd.join(" "));
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(help.contains("Options:"), "unexpected help layout:\n{help}");
        for arg in undocumented(&help) {
            missing.push(format!("spo {}: {arg}", cmd.join(" ")));
        }
    }
    assert!(
        missing.is_empty(),
        "arguments without help text:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_check_sees_an_undocumented_flag() {
    let help = "Options:\n      --model <MODEL>\n      --out <OUT>  Where to write\n      --steps <STEPS>  [default: 30]\n  -h, --help\n          Print help\n";
    assert_eq!(
        undocumented(help),
        ["--model <MODEL>", "--steps <STEPS>  [default: 30]"]
    );
}
