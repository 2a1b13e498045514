//! Admission: what a newly accepted connection becomes, decided by a pure
//! function from the listener it came from, the limits and the counts.
//!
//! The loop counts, calls [`decide`] and applies the [`Decision`]; the
//! [`Kind`] it admits is stored once, in the loop's slot, and picks the
//! connection's first state ([`crate::conn::Conn::new`]).

/// What a listening socket serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// Line-echo clients (`--listen`).
    Echo,
    /// `--metrics` HTTP clients.
    Metrics,
}

/// What an admitted connection is to the server; it decides how the
/// connection starts and how it is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A line-echo client: counted in the metrics and against
    /// `--max-connections`.
    Client,
    /// A client over `--max-connections`, told `error: server busy` and
    /// lingering until it has read it.
    Busy,
    /// A `/metrics` scrape; not counted as traffic nor against the cap.
    Metrics,
}

/// The limits admission applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `--max-connections`: echo clients in the whole process.
    pub max_clients: usize,
    /// Busy clients lingering in this loop at once.
    pub max_busy: usize,
    /// Metrics scrapes in this loop at once.
    pub max_metrics: usize,
}

/// The counts admission looks at, taken before this connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Echo clients in the whole process.
    pub clients: usize,
    /// Busy clients lingering in this loop.
    pub busy: usize,
    /// Metrics scrapes in this loop.
    pub metrics: usize,
}

/// What to do with a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Take it into the slab as this kind.
    Admit(Kind),
    /// Over the cap with the lingering busy clients at their bound: one
    /// best-effort `error: server busy` and a close (counted `busy`).
    TurnAway,
    /// Too many metrics scrapes: close it without a word.
    Refuse,
}

/// Decides what a connection accepted on a `service` listener becomes.
/// Only echo clients count against `--max-connections`: a metrics scrape
/// must still work when the server is full.
pub fn decide(service: Service, counts: Counts, limits: Limits) -> Decision {
    match service {
        Service::Metrics if counts.metrics >= limits.max_metrics => Decision::Refuse,
        Service::Metrics => Decision::Admit(Kind::Metrics),
        Service::Echo if counts.clients < limits.max_clients => Decision::Admit(Kind::Client),
        Service::Echo if counts.busy < limits.max_busy => Decision::Admit(Kind::Busy),
        Service::Echo => Decision::TurnAway,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_clients: 2,
        max_busy: 1,
        max_metrics: 1,
    };

    fn counts(clients: usize, busy: usize, metrics: usize) -> Counts {
        Counts {
            clients,
            busy,
            metrics,
        }
    }

    #[test]
    fn clients_are_admitted_below_the_cap() {
        let d = decide(Service::Echo, counts(1, 0, 0), LIMITS);
        assert_eq!(d, Decision::Admit(Kind::Client));
    }

    #[test]
    fn at_the_cap_a_client_is_told_busy_then_turned_away() {
        let d = decide(Service::Echo, counts(2, 0, 0), LIMITS);
        assert_eq!(d, Decision::Admit(Kind::Busy));
        assert_eq!(
            decide(Service::Echo, counts(2, 1, 0), LIMITS),
            Decision::TurnAway
        );
    }

    #[test]
    fn metrics_ignore_the_client_cap_but_have_their_own() {
        let full = counts(2, 1, 0);
        assert_eq!(
            decide(Service::Metrics, full, LIMITS),
            Decision::Admit(Kind::Metrics)
        );
        assert_eq!(
            decide(Service::Metrics, counts(0, 0, 1), LIMITS),
            Decision::Refuse
        );
    }

    #[test]
    fn a_zero_cap_turns_every_client_into_busy() {
        let limits = Limits {
            max_clients: 0,
            ..LIMITS
        };
        let d = decide(Service::Echo, Counts::default(), limits);
        assert_eq!(d, Decision::Admit(Kind::Busy));
    }
}
