//! Each user's open subscriptions in this process, against a maximum
//! (`--max-subscriptions-per-user`): every transport's subscriptions count, over all sockets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Counts each user's open subscriptions against a maximum.
pub struct SubscriptionQuota {
    max: usize,
    open: Mutex<HashMap<i64, usize>>,
}

/// One open subscription; dropping it frees the slot.
pub struct QuotaSlot {
    quota: Arc<SubscriptionQuota>,
    user: i64,
}

impl SubscriptionQuota {
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new(Self {
            max: max as usize,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more subscription of `user`, or `None` when they hold the maximum.
    pub fn acquire(self: &Arc<Self>, user: i64) -> Option<QuotaSlot> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(user).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(QuotaSlot {
            quota: self.clone(),
            user,
        })
    }

    /// The maximum per user.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for QuotaSlot {
    fn drop(&mut self) {
        let mut open = self
            .quota
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_holds_at_most_max_subscriptions_and_dropping_frees_one() {
        let quota = SubscriptionQuota::new(2);
        let first = quota.acquire(1).expect("first");
        let _second = quota.acquire(1).expect("second");
        assert!(quota.acquire(1).is_none());
        assert!(quota.acquire(2).is_some(), "another user has their own");
        drop(first);
        assert!(quota.acquire(1).is_some());
    }
}
