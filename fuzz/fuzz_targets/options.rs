//! Any options JSON (`spo_options_apply_json`, `spo --options`) or list of
//! `key=value` strings (`spo_options_set`, `spo -o`) must give Options or an
//! Error, never a panic; the job and trainer readers must then accept or
//! refuse the values with an Error too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spo_runtime::pipeline::JobSpec;
use spo_runtime::train::TrainerSpec;
use spo_runtime::Options;

fn consume(o: &Options) {
    let _ = JobSpec::from_options(o);
    if let Ok(spec) = TrainerSpec::from_options(o) {
        let _ = spec.config.segments();
        let _ = spec.config.adamw();
        let _ = spec.config.grad_clip();
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut o = Options::new();
    let before = o.clone();
    if o.apply_json(text).is_err() {
        // A refused overlay applies nothing.
        assert_eq!(o, before);
    }
    consume(&o);
    let pairs = text.lines().filter_map(|l| l.split_once('='));
    if let Ok(o) = Options::from_pairs(pairs) {
        consume(&o);
    }
});
