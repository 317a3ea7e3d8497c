package pages

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/grants"
	"github.com/tokenpipe/tokenpipe/internal/status"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

// PipelineRefresh is how often the pipeline panel reloads itself.
const PipelineRefresh = 5

// clientRow is one client on the admin page.
type clientRow struct {
	clients.Client
	Live    int64
	Refresh bool
}

// admin shows the sign-in form, or the clients with their grants, scopes
// and live tokens.
func (h *Handler) admin(w http.ResponseWriter, r *http.Request) {
	s, err := h.loadSession(r, adminArea)
	if err != nil {
		h.fail(w, adminArea, err)
		return
	}
	flash := h.takeFlash(w, r, adminArea)
	if s == nil || !h.isAdmin(s.user) {
		h.signinForm(w, r, adminArea, http.StatusOK, "", "", flash)
		return
	}
	list, err := clients.List(r.Context(), h.cfg.DB)
	if err != nil {
		h.fail(w, adminArea, err)
		return
	}
	live, err := store.LiveTokensByClient(r.Context(), h.cfg.DB)
	if err != nil {
		h.fail(w, adminArea, fmt.Errorf("count live tokens: %w", err))
		return
	}
	rows := make([]clientRow, 0, len(list))
	for _, c := range list {
		rows = append(rows, clientRow{Client: c, Live: live[c.ID], Refresh: c.Allows("refresh_token")})
	}
	h.render(w, http.StatusOK, "admin", view{Title: "Administration", Area: "admin", User: s.user,
		CSRF: s.csrf(), Flash: flash, Data: rows})
}

func (h *Handler) adminSignin(w http.ResponseWriter, r *http.Request) {
	h.signin(w, r, adminArea, h.isAdmin)
}

// adminForm is the start of every admin form handler: a session of an
// administrator and a form with its CSRF token.
func (h *Handler) adminForm(w http.ResponseWriter, r *http.Request) (*session, bool) {
	s, ok := h.requireSession(w, r, adminArea)
	if !ok {
		return nil, false
	}
	if !h.readForm(w, r, adminArea, func() bool { return sameToken(r.PostForm.Get("csrf"), s.csrf()) }) {
		return nil, false
	}
	return s, true
}

// adminGrant turns one grant of a client on or off.
func (h *Handler) adminGrant(w http.ResponseWriter, r *http.Request) {
	s, ok := h.adminForm(w, r)
	if !ok {
		return
	}
	client, grant, allow := r.PostForm.Get("client"), r.PostForm.Get("grant"), r.PostForm.Get("allow")
	if clients.ValidClientID(client) != nil || !clients.KnownGrant(grant) || (allow != "on" && allow != "off") {
		h.message(w, http.StatusBadRequest, "admin", "The form named no client, grant or setting this page knows.")
		return
	}
	err := h.iss.SetGrant(r.Context(), client, grant, allow == "on", "admin page: "+s.user)
	switch {
	case errors.Is(err, ErrNoClient):
		h.setFlash(w, r, adminArea, fmt.Sprintf("There is no client %s.", client))
	case err != nil:
		h.fail(w, adminArea, err)
		return
	default:
		h.setFlash(w, r, adminArea, fmt.Sprintf("%s: %s is now %s.", client, grant, allow))
	}
	redirect(w, r, "/admin")
}

// adminConfirmRevoke asks before revoking every token of a client.
func (h *Handler) adminConfirmRevoke(w http.ResponseWriter, r *http.Request) {
	s, ok := h.requireSession(w, r, adminArea)
	if !ok {
		return
	}
	client := r.URL.Query().Get("client")
	if clients.ValidClientID(client) != nil {
		h.message(w, http.StatusBadRequest, "admin", "That is not a client id.")
		return
	}
	h.render(w, http.StatusOK, "confirm", view{Title: "Revoke all tokens", Area: "admin", User: s.user, CSRF: s.csrf(),
		Data: confirmation{
			Question: fmt.Sprintf("Revoke every token of %s?", client),
			Detail: "All its access and refresh tokens, for every user and its own, stop working now, queued ones included. " +
				"The client stays registered and can obtain new tokens.",
			Action: "/admin/revoke", Fields: map[string]string{"client": client},
			Button: "Revoke all tokens", Cancel: "/admin",
		}})
}

// adminRevoke revokes every token of a client.
func (h *Handler) adminRevoke(w http.ResponseWriter, r *http.Request) {
	s, ok := h.adminForm(w, r)
	if !ok {
		return
	}
	client := r.PostForm.Get("client")
	if clients.ValidClientID(client) != nil {
		h.message(w, http.StatusBadRequest, "admin", "That is not a client id.")
		return
	}
	n, err := h.iss.RevokeApplication(r.Context(), client, "", store.ReasonAdmin)
	switch {
	case errors.Is(err, ErrNoApplication):
		h.setFlash(w, r, adminArea, fmt.Sprintf("There is no client %s.", client))
	case err != nil:
		h.fail(w, adminArea, err)
		return
	default:
		h.cfg.Log.Info("client tokens revoked on the admin page", "client_id", client, "admin", s.user, "rows_revoked", n)
		h.setFlash(w, r, adminArea, fmt.Sprintf("Every token of %s is revoked (%d stored tokens).", client, n))
	}
	redirect(w, r, "/admin")
}

// userView is the admin's view of one user.
type userView struct {
	Name string
	Apps []grants.Application
}

// adminUser shows one user's applications.
func (h *Handler) adminUser(w http.ResponseWriter, r *http.Request) {
	s, ok := h.requireSession(w, r, adminArea)
	if !ok {
		return
	}
	name := r.URL.Query().Get("name")
	if clients.ValidUsername(name) != nil {
		h.message(w, http.StatusBadRequest, "admin", "That is not a user name.")
		return
	}
	apps, err := grants.Applications(r.Context(), h.cfg.DB, name)
	if err != nil {
		h.fail(w, adminArea, err)
		return
	}
	h.render(w, http.StatusOK, "adminuser", view{Title: "Applications of " + name, Area: "admin", User: s.user,
		CSRF: s.csrf(), Flash: h.takeFlash(w, r, adminArea), Data: userView{Name: name, Apps: apps}})
}

// userPath is the admin page of one user, escaped for a URL.
func userPath(name string) string { return "/admin/user?name=" + url.QueryEscape(name) }

// adminConfirmRemove asks before removing one user's application.
func (h *Handler) adminConfirmRemove(w http.ResponseWriter, r *http.Request) {
	s, ok := h.requireSession(w, r, adminArea)
	if !ok {
		return
	}
	name, client := r.URL.Query().Get("name"), r.URL.Query().Get("client")
	if clients.ValidUsername(name) != nil || clients.ValidClientID(client) != nil {
		h.message(w, http.StatusBadRequest, "admin", "That is not a user name and client id.")
		return
	}
	h.render(w, http.StatusOK, "confirm", view{Title: "Remove access", Area: "admin", User: s.user, CSRF: s.csrf(),
		Data: confirmation{
			Question: fmt.Sprintf("Remove access of %s for %s?", client, name),
			Detail:   "Every token this application holds for this user stops working now, including its refresh tokens.",
			Action:   "/admin/user/remove", Fields: map[string]string{"client": client, "name": name},
			Button: "Remove access", Cancel: userPath(name),
		}})
}

// adminRemove removes one user's application.
func (h *Handler) adminRemove(w http.ResponseWriter, r *http.Request) {
	s, ok := h.adminForm(w, r)
	if !ok {
		return
	}
	name, client := r.PostForm.Get("name"), r.PostForm.Get("client")
	if clients.ValidUsername(name) != nil || clients.ValidClientID(client) != nil {
		h.message(w, http.StatusBadRequest, "admin", "That is not a user name and client id.")
		return
	}
	n, err := h.iss.RevokeApplication(r.Context(), client, name, store.ReasonAdmin)
	switch {
	case errors.Is(err, ErrNoApplication):
		h.setFlash(w, r, adminArea, fmt.Sprintf("%s holds no tokens of %s.", client, name))
	case err != nil:
		h.fail(w, adminArea, err)
		return
	default:
		h.cfg.Log.Info("application removed on the admin page", "client_id", client, "sub", name, "admin", s.user, "rows_revoked", n)
		h.setFlash(w, r, adminArea, fmt.Sprintf("Access of %s for %s removed.", client, name))
	}
	redirect(w, r, userPath(name))
}

// pipeline is the panel with `tokenpipe status`'s figures. It reloads
// itself (meta refresh: no script).
func (h *Handler) pipeline(w http.ResponseWriter, r *http.Request) {
	s, ok := h.requireSession(w, r, adminArea)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	v := view{Title: "Pipeline", Area: "admin", User: s.user, CSRF: s.csrf(), Refresh: PipelineRefresh}
	rep, err := h.gather(ctx)
	if err != nil {
		// Shown, not failed: the panel is most needed while something
		// is broken, and it retries by itself.
		h.cfg.Log.Warn("pipeline panel", "err", err)
		v.Error = "The pipeline's state could not be read: " + err.Error()
	}
	v.Data = rep
	h.render(w, http.StatusOK, "pipeline", v)
}

// gather is status.Gather; in sync mode, without a stream, the rows only.
func (h *Handler) gather(ctx context.Context) (*status.Report, error) {
	if h.cfg.JS != nil {
		return status.Gather(ctx, h.cfg.JS, h.cfg.DB, h.cfg.Topology)
	}
	rows, err := store.RowsByState(ctx, h.cfg.DB)
	if err != nil {
		return nil, fmt.Errorf("count rows by state: %w", err)
	}
	return &status.Report{Time: time.Now().UTC(), Rows: rows}, nil
}
