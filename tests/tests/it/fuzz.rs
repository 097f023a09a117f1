//! The fuzz targets (`broker_tests::fuzz`) on stable: the committed corpus (`fuzz/corpus/`),
//! then a fixed number of mutations of it, seeded (`FUZZ_SEED` replays a run). Every input
//! must be answered: no panic, and the run ends. `./dev fuzz` runs the same targets under
//! cargo-fuzz for as long as asked.

use broker_tests::fuzz::{mutate, TARGETS};

/// Mutations per target in the test suite's short run.
const MUTATIONS: usize = 20_000;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = format!("{}/../fuzz/corpus/{target}", env!("CARGO_MANIFEST_DIR"));
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    entries.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn every_target_answers_its_corpus_and_mutations_of_it() {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = std::time::Instant::now();
    let mut executions = 0;
    for (name, target) in TARGETS {
        let seeds = corpus(name);
        assert!(!seeds.is_empty(), "{name}: an empty corpus");
        for input in &seeds {
            target(input);
            executions += 1;
        }
        for _ in 0..MUTATIONS {
            let a = &seeds[rng.usize(0..seeds.len())];
            let b = &seeds[rng.usize(0..seeds.len())];
            let input = mutate(a, b, &mut rng);
            target(&input);
            executions += 1;
        }
        // Every target with nothing, and with every single byte.
        target(b"");
        for byte in 0..=255u8 {
            target(&[byte]);
        }
        executions += 257;
    }
    println!(
        "fuzz: {executions} executions of {} targets in {:.1} s, seed {seed}, 0 crashes",
        TARGETS.len(),
        started.elapsed().as_secs_f64()
    );
}
