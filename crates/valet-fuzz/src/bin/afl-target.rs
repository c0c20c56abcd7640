//! One AFL++ harness for every target: `afl-target <name>` (see `just fuzz`).

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(target) = valet_fuzz::target(&name) else {
        let names: Vec<&str> = valet_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("usage: afl-target <{}>", names.join("|"));
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| target(data));
}
