//! SeaORM entities for syncgraph's tables, one module per table (see `migration/` for the DDL).

pub mod channel;
pub mod channel_member;
pub mod document;
pub mod live;
pub mod message;
pub mod timestamp;
pub mod user;

pub mod prelude {
    //! The entity types under short names.
    pub use super::channel::Entity as Channel;
    pub use super::channel_member::Entity as ChannelMember;
    pub use super::document::Entity as Document;
    pub use super::message::Entity as Message;
    pub use super::user::Entity as User;
}
