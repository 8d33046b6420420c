//! The EPLB policy against vLLM's own `DefaultEplbPolicy.rebalance_experts`: the inputs and
//! outputs in `fixtures/eplb_golden.json` were made by running vLLM's policy module
//! (`ci/eplb_golden.py VLLM_CHECKOUT` regenerates them).

use dist_core::eplb::{rebalance_experts, PolicyParams};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    load: Vec<Vec<u64>>,
    replicas: usize,
    groups: usize,
    nodes: usize,
    ranks: usize,
    old: Option<Vec<Vec<i64>>>,
    phy2log: Vec<Vec<usize>>,
    native_agrees: bool,
}

#[test]
fn plans_equal_vllms() {
    let text = include_str!("fixtures/eplb_golden.json");
    let g: Golden = serde_json::from_str(text).expect("fixture parses");
    assert!(g.cases.len() >= 300, "{} cases", g.cases.len());
    let mut wrong = Vec::new();
    for c in &g.cases {
        let p = PolicyParams {
            num_replicas: c.replicas,
            num_groups: c.groups,
            num_nodes: c.nodes,
            num_ranks: c.ranks,
        };
        let got = rebalance_experts(&c.load, &p, c.old.as_deref()).expect(&c.name);
        if got != c.phy2log {
            wrong.push(format!(
                "{} (native vLLM agreed: {})",
                c.name, c.native_agrees
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} differ: {wrong:?}",
        wrong.len(),
        g.cases.len()
    );
    // The fixture must exercise every path: ties, huge loads, previous maps, the global policy.
    let has = |f: &dyn Fn(&Case) -> bool| g.cases.iter().any(f);
    assert!(has(&|c| !c.native_agrees));
    assert!(has(&|c| c.load.iter().flatten().any(|&x| x > 1 << 24)));
    assert!(has(&|c| c.old.is_some()));
    assert!(has(&|c| c.groups % c.nodes != 0));
    assert!(has(&|c| c.nodes > 1 && c.groups > c.nodes));
}
