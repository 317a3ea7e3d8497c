package issuer

import (
	"bytes"
	"context"
	"fmt"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// accessStatus reads what decides whether an unexpired access token is
// live; store.AccessStatus.Effective is the rule.
func (s *Server) accessStatus(ctx context.Context, d events.Digest, c tokens.Claims) (store.AccessStatus, error) {
	// Before the row exists a grant revocation counts from the earliest
	// time the token could have been issued (see maxClockSkew).
	st, err := store.ReadAccessStatus(ctx, s.db, d, c, c.IssuedAt.Add(-maxClockSkew))
	if err != nil {
		return st, fmt.Errorf("access token status: %w", err)
	}
	return st, nil
}

// refreshStatus is what the database says of a refresh token.
type refreshStatus struct {
	revoked    bool
	answeredAt *time.Time // first answered redemption, if any
	userExists bool       // the resource owner (or, for a client's own token, the client)
}

func (s *Server) refreshState(ctx context.Context, d events.Digest, c tokens.Claims) (refreshStatus, error) {
	// A refresh token dies with its family; while its row is queued, also
	// with a recent grant revocation (see store.ReadRefreshStatus). Its user
	// must have existed when it was issued: a coalesced token's issue time
	// is its window's start, and issuer clocks may trail the database's.
	userBefore := c.IssuedAt.Add(maxClockSkew + s.cfg.CoalesceWindow)
	row, err := store.ReadRefreshStatus(ctx, s.db, d, c, c.IssuedAt.Add(-maxClockSkew), userBefore)
	if err != nil {
		return refreshStatus{}, fmt.Errorf("refresh token status: %w", err)
	}
	return refreshStatus{
		revoked:    row.FamilyRevoked || (!row.HasRow && row.GrantRevoked),
		answeredAt: row.AnsweredAt,
		userExists: row.UserExists,
	}, nil
}

// recorded is what a request that derived an already recorded token needs to
// know about it.
type recorded int

const (
	stateLive       recorded = iota // may be handed out (again)
	stateSuperseded                 // INACTIVE: a newer token of its key won
	stateDead                       // revoked, expired, or (coalesced) its refresh token already used
)

// recordedState reports what became of a token recorded before. With
// refreshUsed, a token whose refresh token was already redeemed counts as
// dead: sharing it would hand a used refresh token to a new client.
func (s *Server) recordedState(ctx context.Context, m *minted, seq uint64, refreshUsed bool) (recorded, error) {
	var refresh []byte
	if m.refresh != "" {
		d := events.DigestOf(m.refresh)
		refresh = d[:]
	}
	st, err := store.ReadRecordedStatus(ctx, s.db, m.event.TokenDigest, m.access, seq, m.access.IssuedAt.Add(-maxClockSkew), refresh)
	if err != nil {
		return stateDead, fmt.Errorf("recorded token status: %w", err)
	}
	switch {
	case st.FamilyRevoked, st.State == nil && st.GrantRevoked, refreshUsed && st.Rotated:
		return stateDead, nil
	case st.State == nil, *st.State == "ACTIVE":
		return stateLive, nil
	case *st.State == "INACTIVE":
		return stateSuperseded, nil
	}
	return stateDead, nil
}

// shareActive returns the key's ACTIVE token when it is a coalesced token of
// the same request, so it can be derived again (its text is stored nowhere);
// nil when there is none or it is not ours to hand out.
func (s *Server) shareActive(ctx context.Context, rq request, now time.Time) (*minted, error) {
	row, err := store.ReadActiveOfKey(ctx, s.db, store.Key{ClientID: rq.clientID, Subject: rq.subject, Scope: events.JoinScopes(rq.scopes)})
	if err != nil {
		return nil, fmt.Errorf("read the key's active token: %w", err)
	}
	if row == nil {
		return nil, nil
	}
	w := s.cfg.CoalesceWindow.Milliseconds()
	ms := row.IssuedAt.UnixMilli()
	if row.GrantType != rq.grant || row.HasRefresh != rq.refresh || row.FamilyRevoked || row.Rotated || len(row.Family) != len(tokens.Family{}) || w <= 0 || ms%w != 0 {
		return nil, nil
	}
	for gen := range maxGenerations {
		sp := s.coalescedSpec(rq, ms/w, gen)
		if !bytes.Equal(sp.family[:], row.Family) {
			continue
		}
		m, err := s.build(sp, now)
		if err != nil {
			return nil, err
		}
		// Another signing key (a rotation in progress) derives another text.
		if !bytes.Equal(m.event.TokenDigest[:], row.Digest) || m.access.Expired(now) {
			return nil, nil
		}
		return m, nil
	}
	return nil, nil
}
