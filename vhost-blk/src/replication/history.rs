//! How two copies' epoch histories relate (DESIGN.md, "Divergence and
//! rejoin").
//!
//! Every epoch has one writer, and each entry names the lsn its epoch
//! began at and the copy that raised it, so two histories agree exactly as
//! far as their common prefix goes. After it, the copy whose history ends
//! there holds records of the last shared epoch that the other may lack:
//! the common point is where the other's next epoch began, minus one.

use rewind_journal::EpochStart;

/// Where one history (mine) stands against another (theirs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// The same epochs.
    Same,
    /// Theirs continues mine: they were promoted after my last epoch, and
    /// everything I hold after `common` never reached them.
    Behind { common: u64 },
    /// Mine continues theirs.
    Ahead { common: u64 },
    /// Each holds an epoch the other lacks: both were promoted (split
    /// brain). Records after `common` differ.
    Diverged { common: u64 },
}

/// How `mine` relates to `theirs`.
pub fn relate(mine: &[EpochStart], theirs: &[EpochStart]) -> Relation {
    let shared = mine.iter().zip(theirs).take_while(|(a, b)| a == b).count();
    let before = |start: &EpochStart| start.first_lsn.saturating_sub(1);
    match (mine.get(shared), theirs.get(shared)) {
        (None, None) => Relation::Same,
        (None, Some(next)) => Relation::Behind {
            common: before(next),
        },
        (Some(next), None) => Relation::Ahead {
            common: before(next),
        },
        (Some(a), Some(b)) => Relation::Diverged {
            common: before(a).min(before(b)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(epoch: u64, first_lsn: u64, node: u64) -> EpochStart {
        EpochStart {
            epoch,
            first_lsn,
            node,
        }
    }

    #[test]
    fn a_failed_over_primary_is_behind_at_the_new_epoch() {
        let old = [start(1, 1, 0), start(2, 40, 7)];
        let new = [start(1, 1, 0), start(2, 40, 7), start(3, 90, 8)];
        assert_eq!(relate(&old, &new), Relation::Behind { common: 89 });
        assert_eq!(relate(&new, &old), Relation::Ahead { common: 89 });
        assert_eq!(relate(&new, &new), Relation::Same);
    }

    #[test]
    fn two_promotions_diverge_where_the_first_began() {
        let base = [start(1, 1, 0)];
        let a = [base[0], start(2, 90, 7)];
        let b = [base[0], start(2, 100, 8)];
        assert_eq!(relate(&a, &b), Relation::Diverged { common: 89 });
        assert_eq!(relate(&b, &a), Relation::Diverged { common: 89 });
        // The same epoch at the same lsn by two copies still differs.
        let c = [base[0], start(2, 90, 9)];
        assert_eq!(relate(&a, &c), Relation::Diverged { common: 89 });
    }
}
