// The operations this client sends. `graphql()` comes from the generated src/gql/: each
// document is typed with its result and variables, checked against schema.graphql.
import { graphql } from './gql/index.js';

export const MessageFields = graphql(`
  fragment MessageFields on Message {
    id
    body
    version
    updatedAt
    author {
      id
      name
    }
  }
`);

export const SignUp = graphql(`
  mutation SignUp($input: SignUpInput!) {
    signUp(input: $input) {
      token
      user {
        id
        name
      }
    }
  }
`);

export const CreateChannel = graphql(`
  mutation CreateChannel($name: String!) {
    createChannel(input: { name: $name }) {
      id
      name
    }
  }
`);

/** The newest messages, and where the live feed should start so that none is missed. */
export const ChannelSnapshot = graphql(`
  query ChannelSnapshot($id: ID!) {
    feedCursor
    channel(id: $id) {
      id
      name
      messages(last: 50) {
        edges {
          node {
            ...MessageFields
          }
        }
      }
    }
  }
`);

export const MessageEvents = graphql(`
  subscription MessageEvents($channelId: ID!, $after: String) {
    messageEvents(channelId: $channelId, after: $after) {
      cursor
      kind
      message {
        ...MessageFields
      }
    }
  }
`);

export const PostMessage = graphql(`
  mutation PostMessage($input: PostMessageInput!) {
    postMessage(input: $input) {
      ...MessageFields
    }
  }
`);

export const EditMessage = graphql(`
  mutation EditMessage($input: EditMessageInput!) {
    editMessage(input: $input) {
      ...MessageFields
    }
  }
`);

export const AddChannelMember = graphql(`
  mutation AddChannelMember($input: AddChannelMemberInput!) {
    addChannelMember(input: $input) {
      id
    }
  }
`);

/** The viewer's channels and their members, kept current by the server (`@live`). */
export const LiveInbox = graphql(`
  query LiveInbox @live {
    channels(first: 50) {
      edges {
        node {
          id
          name
          members {
            name
          }
        }
      }
    }
  }
`);
