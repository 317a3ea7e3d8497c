package pages

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/grants"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

// account shows the sign-in form, or the signed-in user's applications.
func (h *Handler) account(w http.ResponseWriter, r *http.Request) {
	s, err := h.loadSession(r, accountArea)
	if err != nil {
		h.fail(w, accountArea, err)
		return
	}
	flash := h.takeFlash(w, r, accountArea)
	if s == nil {
		h.signinForm(w, r, accountArea, http.StatusOK, "", "", flash)
		return
	}
	apps, err := grants.Applications(r.Context(), h.cfg.DB, s.user)
	if err != nil {
		h.fail(w, accountArea, err)
		return
	}
	h.render(w, http.StatusOK, "account", view{Title: "My applications", Area: "account", User: s.user,
		CSRF: s.csrf(), Flash: flash, Data: apps})
}

func (h *Handler) accountSignin(w http.ResponseWriter, r *http.Request) {
	h.signin(w, r, accountArea, func(string) bool { return true })
}

// confirmation is what the confirm page shows.
type confirmation struct {
	Question string
	Detail   string
	Action   string            // the form's target
	Fields   map[string]string // hidden fields besides csrf
	Button   string
	Cancel   string // where "Cancel" goes
}

// accountConfirmRemove asks before removing an application. GET changes
// nothing; the removal is the form it shows.
func (h *Handler) accountConfirmRemove(w http.ResponseWriter, r *http.Request) {
	s, ok := h.requireSession(w, r, accountArea)
	if !ok {
		return
	}
	client := r.URL.Query().Get("client")
	if clients.ValidClientID(client) != nil {
		h.message(w, http.StatusBadRequest, "account", "That is not an application id.")
		return
	}
	h.render(w, http.StatusOK, "confirm", view{Title: "Remove access", Area: "account", User: s.user, CSRF: s.csrf(),
		Data: confirmation{
			Question: fmt.Sprintf("Remove access for %s?", client),
			Detail: "Every token this application holds for you stops working now, including its refresh tokens. " +
				"The application will have to ask you to sign in again.",
			Action: "/account/remove", Fields: map[string]string{"client": client},
			Button: "Remove access", Cancel: "/account",
		}})
}

// accountRemove revokes the signed-in user's tokens for one application.
// The user is always the session's: the form names only the client.
func (h *Handler) accountRemove(w http.ResponseWriter, r *http.Request) {
	s, ok := h.requireSession(w, r, accountArea)
	if !ok {
		return
	}
	if !h.readForm(w, r, accountArea, func() bool { return sameToken(r.PostForm.Get("csrf"), s.csrf()) }) {
		return
	}
	client := r.PostForm.Get("client")
	if clients.ValidClientID(client) != nil {
		h.message(w, http.StatusBadRequest, "account", "That is not an application id.")
		return
	}
	n, err := h.iss.RevokeApplication(r.Context(), client, s.user, store.ReasonUser)
	switch {
	case errors.Is(err, ErrNoApplication):
		h.setFlash(w, r, accountArea, fmt.Sprintf("No application %s holds tokens for you.", client))
	case err != nil:
		h.fail(w, accountArea, err)
		return
	default:
		h.cfg.Log.Info("application removed on the account page", "client_id", client, "sub", s.user, "rows_revoked", n)
		h.setFlash(w, r, accountArea, fmt.Sprintf("Access removed for %s: its tokens no longer work.", client))
	}
	redirect(w, r, "/account")
}
