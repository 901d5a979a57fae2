//! Round-robin versus adaptive pairing on simulated batches (planted abilities, Bradley-Terry
//! noise): comparisons asked and ranking accuracy (Spearman with the truth), means over seeds.
//!
//! `cargo run --release -p cj-assessment --example pairing_bench`

use cj_assessment::pairing::Pairing;
use cj_assessment::simulation::trial;
use cj_assessment::{Strategy, DEFAULT_MAX_COMPARISONS};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    const SEEDS: u64 = 20;
    println!("| essays | pairing | comparisons (mean) | per essay | Spearman (mean) | Spearman (worst) |");
    println!("|---|---|---|---|---|---|");
    for n in [20, 50, 100, 200] {
        let strategies = [
            ("round-robin, 10 per essay", Strategy::RoundRobin),
            (
                "adaptive, stop at rho 0.98 (default)",
                Strategy::Adaptive(Pairing::default()),
            ),
            (
                "adaptive, stop at rho 0.99",
                Strategy::Adaptive(Pairing {
                    stability: 0.99,
                    ..Pairing::default()
                }),
            ),
            (
                "adaptive, stop at rho 0.97",
                Strategy::Adaptive(Pairing {
                    stability: 0.97,
                    ..Pairing::default()
                }),
            ),
        ];
        for (name, strategy) in strategies {
            let (mut asked, mut rho, mut worst) = (0.0, 0.0, f64::MAX);
            for seed in 0..SEEDS {
                let (c, r) = trial(n, seed, strategy, DEFAULT_MAX_COMPARISONS)
                    .await
                    .expect("judged");
                asked += c as f64;
                rho += r;
                worst = worst.min(r);
            }
            let (asked, rho) = (asked / SEEDS as f64, rho / SEEDS as f64);
            println!(
                "| {n} | {name} | {asked:.0} | {:.1} | {rho:.3} | {worst:.3} |",
                2.0 * asked / n as f64
            );
        }
    }
}
