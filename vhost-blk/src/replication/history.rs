//! How two copies' epoch histories relate (DESIGN.md, "Divergence and
//! rejoin").
//!
//! Every epoch has one writer, and each entry names the lsn its epoch
//! began at and the copy that raised it, so an entry both histories hold
//! means they agree on everything before it, and exactly as far as their
//! common prefix goes. After it, the copy whose history ends there holds
//! records of the last shared epoch that the other may lack: the common
//! point is where the other's next epoch began, minus one.
//!
//! A history forgets its oldest epochs past `MAX_EPOCHS` (the journal's
//! `compact_epochs`), so two may start at different epochs: they are
//! compared from the later start, which the other must hold as it is.
//! When it does not (it ended before, or forgot it, or holds another
//! entry for that epoch), nothing says where they part: they are
//! unrelated, and no common point is guessed.

use rewind_journal::{EpochStart, MAX_EPOCHS};

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
    /// Neither holds the other's first entry as it is: the two cannot be
    /// compared (one is too far behind, or not a copy of the same
    /// history).
    Unrelated,
}

/// What is wrong with an epoch history a peer sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadHistory {
    #[error("the epoch history is empty")]
    Empty,
    #[error("the epoch history lists {epochs} epochs; a volume keeps at most {MAX_EPOCHS}")]
    TooLong { epochs: usize },
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
/// keeps it: at most `MAX_EPOCHS` entries, from any epoch (older ones may
/// be forgotten); epochs increase, and so do their first lsns (an Epoch
/// record each), except that the epoch after epoch 1 may begin at lsn 1
/// like it: epoch 1 is every copy's start, without a record.
pub fn check(history: &[EpochStart]) -> Result<(), BadHistory> {
    let first = history.first().ok_or(BadHistory::Empty)?;
    if history.len() > MAX_EPOCHS {
        return Err(BadHistory::TooLong {
            epochs: history.len(),
        });
    }
    if first.first_lsn == 0 {
        return Err(BadHistory::LsnZero { epoch: first.epoch });
    }
    for pair in history.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.epoch <= a.epoch {
            return Err(BadHistory::EpochOrder {
                previous: a.epoch,
                epoch: b.epoch,
            });
        }
        if b.first_lsn < a.first_lsn || (b.first_lsn == a.first_lsn && a.epoch != 1) {
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
    let Some((mine, theirs)) = align(mine, theirs) else {
        return Relation::Unrelated;
    };
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

/// Both histories from the later of their first entries on, if the other
/// holds that very entry (then both agree on everything before it); None
/// if it does not.
fn align<'a>(
    mine: &'a [EpochStart],
    theirs: &'a [EpochStart],
) -> Option<(&'a [EpochStart], &'a [EpochStart])> {
    let (m, t) = (mine.first()?, theirs.first()?);
    if m.epoch >= t.epoch {
        Some((mine, from_entry(theirs, m)?))
    } else {
        Some((from_entry(mine, t)?, theirs))
    }
}

/// `history` from `entry` on, if it holds that entry as it is.
fn from_entry<'a>(history: &'a [EpochStart], entry: &EpochStart) -> Option<&'a [EpochStart]> {
    let at = history.iter().position(|e| e.epoch == entry.epoch)?;
    history.get(at..).filter(|from| from.first() == Some(entry))
}

/// "epochs A..=B" of a history, for messages (a history may list
/// thousands).
fn span(history: &[EpochStart]) -> String {
    match (history.first(), history.last()) {
        (Some(first), Some(last)) => format!(
            "epochs {}..={} (from lsn {})",
            first.epoch, last.epoch, first.first_lsn
        ),
        _ => "no epochs".into(),
    }
}

/// Why a copy refuses a peer whose history it cannot relate to its own,
/// and what to do: never guessed at, since a wrong common point would cut
/// records or keep the wrong ones.
pub fn unrelated(mine: &[EpochStart], theirs: &[EpochStart]) -> String {
    format!(
        "the epoch histories cannot be related: this node's lists {}, the peer's {}, and \
         neither holds the other's first entry as it is (the copy behind missed more role \
         changes than the other's history remembers, or the two are not copies of one \
         history); nothing was changed. Recreate the copy that is behind as a replica of the \
         other (`rewind-blk create --replica-of`: a full resync replaces its disk, and no \
         branch keeps its writes). If both were primaries (a split brain), neither is behind: \
         first keep the data of the one you recreate (`rewindctl materialize` of it to an \
         image)",
        span(mine),
        span(theirs),
    )
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

    /// Epochs `from..=to` of one history: epoch 1 at lsn 1, each later
    /// one ten lsns after the one before.
    fn epochs(from: u64, to: u64) -> Vec<EpochStart> {
        (from..=to)
            .map(|epoch| start(epoch, 1 + (epoch - 1) * 10, epoch % 3))
            .collect()
    }

    #[test]
    fn compacted_histories_relate_from_the_later_first_entry() {
        // Compaction kept 3000..=5000 of one, 4000..=6000 of the other.
        let a = epochs(3000, 5000);
        let b = epochs(4000, 6000);
        assert_eq!(relate(&b, &b), Relation::Same);
        assert_eq!(relate(&a, &epochs(4000, 5000)), Relation::Same);
        let common = 5000 * 10;
        assert_eq!(relate(&a, &b), Relation::Behind { common });
        assert_eq!(relate(&b, &a), Relation::Ahead { common });
        // One never forgot its start: it still relates by that entry.
        assert_eq!(relate(&epochs(1, 10), &a), Relation::Unrelated);
        assert_eq!(
            relate(&epochs(1, 3500), &a),
            Relation::Behind { common: 3500 * 10 }
        );
    }

    #[test]
    fn compacted_histories_diverge_after_the_entry_both_hold() {
        let mut a = epochs(3000, 5000);
        let mut b = epochs(4000, 5000);
        a.push(start(5001, 50_100, 7));
        b.push(start(5001, 50_050, 8));
        assert_eq!(relate(&a, &b), Relation::Diverged { common: 50_049 });
        assert_eq!(relate(&b, &a), Relation::Diverged { common: 50_049 });
    }

    #[test]
    fn compacted_histories_without_the_later_start_are_unrelated() {
        // Too far behind: it ends before the other's first entry.
        assert_eq!(
            relate(&epochs(1, 100), &epochs(3000, 5000)),
            Relation::Unrelated
        );
        assert_eq!(
            relate(&epochs(3000, 5000), &epochs(1, 100)),
            Relation::Unrelated
        );
        // Both compacted, one ends before the other's first entry.
        assert_eq!(
            relate(&epochs(3000, 3200), &epochs(3300, 5000)),
            Relation::Unrelated
        );
        // It holds that epoch, but raised by another copy, or from
        // another lsn: another history, though all after it agree.
        let mut other = epochs(3000, 5000);
        other[0].node = 99;
        assert_eq!(relate(&epochs(2000, 5000), &other), Relation::Unrelated);
        other[0] = start(3000, 29_995, 0);
        assert_eq!(relate(&other, &epochs(2000, 5000)), Relation::Unrelated);
        assert_eq!(relate(&[], &epochs(1, 2)), Relation::Unrelated);
    }

    #[test]
    fn the_unrelated_refusal_says_to_keep_a_primarys_data_before_recreating_it() {
        let why = unrelated(&epochs(1, 100), &epochs(3000, 5000));
        assert!(why.contains("epochs 1..=100"), "{why}");
        assert!(why.contains("rewind-blk create --replica-of"), "{why}");
        // Neither of two primaries is behind: recreating one gives its
        // writes up, so its data is kept first.
        assert!(
            why.contains("If both were primaries (a split brain), neither is behind"),
            "{why}"
        );
        assert!(why.contains("`rewindctl materialize`"), "{why}");
    }

    #[test]
    fn a_compacted_history_is_well_formed_and_bad_ones_still_are_not() {
        assert_eq!(check(&epochs(3000, 3000 + MAX_EPOCHS as u64 - 1)), Ok(()));
        assert_eq!(check(&[start(4097, 1, 7), start(4098, 9, 8)]), Ok(()));
        assert_eq!(
            check(&epochs(3000, 3000 + MAX_EPOCHS as u64)),
            Err(BadHistory::TooLong {
                epochs: MAX_EPOCHS + 1
            })
        );
        // Only epoch 1 has no record: the next after any other begins
        // after it.
        assert_eq!(
            check(&[start(4097, 1, 7), start(4098, 1, 8)]),
            Err(BadHistory::LsnOrder {
                previous: 4097,
                previous_lsn: 1,
                epoch: 4098,
                first_lsn: 1
            })
        );
        assert_eq!(
            check(&[start(4097, 0, 7)]),
            Err(BadHistory::LsnZero { epoch: 4097 })
        );
        assert_eq!(
            check(&[start(4097, 5, 7), start(4097, 9, 8)]),
            Err(BadHistory::EpochOrder {
                previous: 4097,
                epoch: 4097
            })
        );
    }
}
