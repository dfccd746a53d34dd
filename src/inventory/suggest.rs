//! "Did you mean" suggestions for misspelt keys, roles and host names.

/// Returns the candidate closest to `word` by edit distance, if it is close enough to be a
/// likely typo: at most one edit for words of up to five characters, else a third of the
/// word's length, rounded down. Ties go to the earliest candidate.
pub fn closest_match<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .filter(|candidate| *candidate != word)
        .map(|candidate| (edit_distance(word, candidate), candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Edit distance over characters: the fewest insertions, deletions, substitutions and swaps of
/// two neighbouring characters that turn `a` into `b` (the optimal string alignment
/// distance), so that `wbe` is one edit from `web`.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Three rows of the table: two rows back, the previous row and the current one.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for i in 0..a.len() {
        current[0] = i + 1;
        for j in 0..b.len() {
            let substitution = previous[j] + usize::from(a[i] != b[j]);
            let mut best = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
            if i > 0 && j > 0 && a[i] == b[j - 1] && a[i - 1] == b[j] {
                best = best.min(before[j - 1] + 1);
            }
            current[j + 1] = best;
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("address", "address"), 0);
        assert_eq!(edit_distance("adress", "address"), 1);
        assert_eq!(edit_distance("roels", "roles"), 1);
        assert_eq!(edit_distance("wbe", "web"), 1);
        assert_eq!(edit_distance("", "web"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn closest_match_suggests_typos_only() {
        let keys = ["address", "roles", "ssh"];
        assert_eq!(closest_match("adress", keys), Some("address"));
        assert_eq!(closest_match("role", keys), Some("roles"));
        assert_eq!(closest_match("sh", keys), Some("ssh"));
        assert_eq!(
            closest_match("wbe", ["postgres", "redis", "worker", "web"]),
            Some("web")
        );
        assert_eq!(closest_match("colour", keys), None);
        assert_eq!(closest_match("address", keys), None);
    }
}
