//! Properties of the Burn Llama on a tiny random model: the KV cache and
//! batching change nothing, and generation is deterministic.

use burn::tensor::{Device, Int, Tensor, TensorData};
use oqt_core::sampling::SamplingOptions;
use oqt_core::testing::{random_weights, tiny_config};
use oqt_model::import::llama_from_weights;
use oqt_model::{KvCache, Llama};

fn tiny() -> Llama {
    let cfg = tiny_config();
    llama_from_weights(&cfg, random_weights(&cfg, 42), &Device::flex())
}

fn ids(model: &Llama, rows: &[&[u32]]) -> Tensor<2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    let data: Vec<i64> = rows.iter().flat_map(|r| r.iter().map(|&t| t as i64)).collect();
    Tensor::from_data(TensorData::new(data, [b, s]), &model.device())
}

fn values(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

const SEQ: [u32; 12] = [5, 17, 250, 3, 99, 100, 7, 7, 260, 1, 42, 13];

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let m = tiny();
    let full = values(m.forward(ids(&m, &[&SEQ]), None));
    let mut cache = KvCache::new(m.n_layers());
    let mut stepped = values(m.forward(ids(&m, &[&SEQ[..5]]), Some(&mut cache)));
    for t in &SEQ[5..] {
        stepped.extend(values(m.forward(ids(&m, &[&[*t]]), Some(&mut cache))));
    }
    assert_eq!(cache.len(), SEQ.len());
    let d = max_abs_diff(&full, &stepped);
    assert!(d < 1e-4, "max |Δlogit| {d}");
}

#[test]
fn batch_rows_equal_single_sequences() {
    let m = tiny();
    let other: Vec<u32> = SEQ.iter().rev().copied().collect();
    let batch = values(m.forward(ids(&m, &[&SEQ, &other]), None));
    let a = values(m.forward(ids(&m, &[&SEQ]), None));
    let b = values(m.forward(ids(&m, &[&other]), None));
    let half = batch.len() / 2;
    assert!(max_abs_diff(&batch[..half], &a) < 1e-4);
    assert!(max_abs_diff(&batch[half..], &b) < 1e-4);
}

#[test]
fn causal_mask_hides_the_future() {
    let m = tiny();
    let mut changed = SEQ;
    changed[11] = 200;
    let a = values(m.forward(ids(&m, &[&SEQ]), None));
    let b = values(m.forward(ids(&m, &[&changed]), None));
    let v = m.vocab_size();
    // Positions before the change are identical; the changed one differs.
    assert!(max_abs_diff(&a[..11 * v], &b[..11 * v]) == 0.0);
    assert!(max_abs_diff(&a[11 * v..], &b[11 * v..]) > 1e-3);
}

#[test]
fn generation_is_deterministic_and_respects_limits() {
    let m = tiny();
    let run = |seed| {
        let mut out = Vec::new();
        let opts = SamplingOptions {
            temperature: 0.8,
            top_p: 0.9,
            seed,
        };
        let stats = oqt_model::generate::generate(&m, &SEQ[..4], 6, opts, |_| false, |t| out.push(t)).unwrap();
        assert_eq!(stats.generated_tokens, 6);
        out
    };
    assert_eq!(run(1), run(1));
    // Stopping on the first token produces nothing.
    let mut out = Vec::new();
    let s =
        oqt_model::generate::generate(&m, &SEQ[..4], 6, SamplingOptions::default(), |_| true, |t| out.push(t)).unwrap();
    assert_eq!((s.generated_tokens, out.len()), (0, 0));
}
