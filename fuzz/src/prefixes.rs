//! The property every streaming parser in echoloop must have: on a buffer
//! that grows read by read, its first final answer (anything but "read
//! more") never changes.
//!
//! The server calls such a parser on everything received so far after each
//! read, and acts on the first final answer. A way of splitting the input
//! into reads is a set of prefix lengths, and its verdict is the answer at
//! the first of them that is final. So "the same verdict for every split"
//! holds exactly when, once some prefix gets a final answer, every longer
//! prefix gets the same one: if the answers at `k` and at some `q > k`
//! differed, the one-read split `[q]` and the two-read split `[k, q - k]`
//! would disagree. Checking every prefix checks every split at once.

use std::fmt::Debug;

/// Calls `parse` on every prefix of `input`, shortest first, where `None`
/// means "incomplete, read more", and asserts that once an answer is final
/// every longer prefix gets the same answer.
///
/// Returns the first final answer with the length of the prefix that got
/// it, or `None` if every prefix (the whole input included) is incomplete.
pub fn first_final<T: PartialEq + Debug>(
    input: &[u8],
    parse: impl Fn(&[u8]) -> Option<T>,
) -> Option<(usize, T)> {
    let (at, answer) = (0..=input.len()).find_map(|end| parse(&input[..end]).map(|a| (end, a)))?;
    for end in at + 1..=input.len() {
        let later = parse(&input[..end]);
        assert!(
            later.as_ref() == Some(&answer),
            "the answer changed with more bytes: {answer:?} after {at} bytes, \
             {later:?} after {end} (input {input:02x?})"
        );
    }
    Some((at, answer))
}
