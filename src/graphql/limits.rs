//! Per-address limits that resolvers enforce: signIn/signUp attempts per client address, in
//! this process's memory (open subscriptions per user are counted by `live::quota`).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// Largest `first`/`last` of a page (`--max-page-size`), as schema data.
#[derive(Clone, Copy, Debug)]
pub struct PageLimit(pub i32);

/// The page-size limit of the schema serving `ctx`.
pub fn page_limit(ctx: &async_graphql::Context<'_>) -> i32 {
    ctx.data_opt::<PageLimit>()
        .map_or(crate::graphql::input::PAGE_SIZE_MAX, |limit| limit.0)
}

/// The client's address, attached to each request by the transport.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub IpAddr);

/// signIn/signUp attempts per client address: a burst of `per_minute`, refilled evenly.
pub struct AuthLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
    checks: std::sync::atomic::AtomicU64,
}

/// Addresses remembered before idle ones are forgotten.
const REMEMBERED_ADDRESSES: usize = 10_000;

impl AuthLimiter {
    pub fn new(per_minute: u32) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_minute(per_minute)),
            clock: DefaultClock::default(),
            checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes one attempt for `addr`; when none is left, how long until the next one.
    pub fn check(&self, addr: IpAddr) -> Result<(), Duration> {
        // Forgetting idle addresses scans them all: do it every 1,024 checks, not each one.
        let checks = self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if checks.is_multiple_of(1024) && self.limiter.len() > REMEMBERED_ADDRESSES {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&client_key(addr))
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// The key an address is limited by: IPv4 as is; IPv6 by its /64, since one client usually
/// holds a whole /64 and could otherwise use a fresh address per attempt.
fn client_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_past_the_burst_wait() {
        let limiter = AuthLimiter::new(3);
        let addr: IpAddr = [127, 0, 0, 1].into();
        for _ in 0..3 {
            assert!(limiter.check(addr).is_ok());
        }
        let wait = limiter.check(addr).expect_err("the fourth waits");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(
            limiter.check([10, 0, 0, 1].into()).is_ok(),
            "another address"
        );
    }

    #[test]
    fn ipv6_addresses_of_one_64_share_an_allowance() {
        let limiter = AuthLimiter::new(2);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(limiter.check(a).is_ok());
        assert!(limiter.check(b).is_ok());
        assert!(limiter.check(a).is_err(), "the same /64");
        assert!(limiter.check(other).is_ok(), "another /64");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_key(mapped), IpAddr::from([192, 0, 2, 1]));
    }
}
