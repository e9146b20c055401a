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

/// What is wrong with an epoch history a peer sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadHistory {
    #[error("the epoch history is empty")]
    Empty,
    #[error("epoch {epoch} starts at lsn 0; lsns start at 1")]
    LsnZero { epoch: u64 },
    #[error("epoch {epoch} follows epoch {previous}; epochs must increase")]
    EpochOrder { previous: u64, epoch: u64 },
    #[error(
        "epoch {epoch} starts at lsn {first_lsn}, not after epoch {previous}'s start at lsn \
         {previous_lsn}"
    )]
    LsnOrder {
        previous: u64,
        previous_lsn: u64,
        epoch: u64,
        first_lsn: u64,
    },
}

/// Checks the shape of a history a peer sent, before anything relates or
/// keeps it: epochs increase, and so do their first lsns (an Epoch record
/// each), except that the second epoch may begin at lsn 1 like the first,
/// which every copy shares without a record.
pub fn check(history: &[EpochStart]) -> Result<(), BadHistory> {
    let first = history.first().ok_or(BadHistory::Empty)?;
    if first.first_lsn == 0 {
        return Err(BadHistory::LsnZero { epoch: first.epoch });
    }
    for (i, pair) in history.windows(2).enumerate() {
        let (a, b) = (pair[0], pair[1]);
        if b.epoch <= a.epoch {
            return Err(BadHistory::EpochOrder {
                previous: a.epoch,
                epoch: b.epoch,
            });
        }
        if b.first_lsn < a.first_lsn || (b.first_lsn == a.first_lsn && i > 0) {
            return Err(BadHistory::LsnOrder {
                previous: a.epoch,
                previous_lsn: a.first_lsn,
                epoch: b.epoch,
                first_lsn: b.first_lsn,
            });
        }
    }
    Ok(())
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

    #[test]
    fn histories_out_of_order_are_named() {
        assert_eq!(check(&[]), Err(BadHistory::Empty));
        assert_eq!(
            check(&[start(1, 0, 0)]),
            Err(BadHistory::LsnZero { epoch: 1 })
        );
        // A promotion before any write: epoch 2's record is lsn 1.
        assert_eq!(
            check(&[start(1, 1, 0), start(2, 1, 7), start(3, 9, 8)]),
            Ok(())
        );
        assert_eq!(
            check(&[start(1, 1, 0), start(0, 1, 7)]),
            Err(BadHistory::EpochOrder {
                previous: 1,
                epoch: 0
            })
        );
        assert_eq!(
            check(&[start(1, 1, 0), start(2, 40, 7), start(3, 40, 8)]),
            Err(BadHistory::LsnOrder {
                previous: 2,
                previous_lsn: 40,
                epoch: 3,
                first_lsn: 40
            })
        );
        assert!(check(&[start(1, 5, 0), start(2, 4, 7)]).is_err());
    }
}
